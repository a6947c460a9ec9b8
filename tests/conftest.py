"""Shared fixtures: the demo model's torch components (tiny, random, deterministic)."""

from __future__ import annotations

import os
import tempfile

import pytest

# Engine-cache artifacts (ORT's optimized graphs, plans) go to a per-run temp folder, not
# the user's ~/.cache; set here, at import, so the CLI subprocesses inherit it too.
os.environ.setdefault("SDRT_CACHE_DIR", tempfile.mkdtemp(prefix="sdrt-test-cache-"))


@pytest.fixture(scope="session")
def demo_components():
    """export.components.build_components("demo", seed=0); skips without the export extras."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from export.components import build_components

    return build_components("demo", seed=0)

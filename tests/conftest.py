"""Shared fixtures: the demo model's torch components (tiny, random, deterministic)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_components():
    """export.components.build_components("demo", seed=0); skips without the export extras."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from export.components import build_components

    return build_components("demo", seed=0)

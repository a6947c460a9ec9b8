"""The export code reproduces the shipped demo bundle (runtime/demo_bundle).

Re-exports `demo` to a temporary folder and compares with the shipped bundle: the same
weights (source hash), the same manifest apart from package versions, identical
tokenizer and scheduler files, and the same ONNX Runtime outputs on fixed inputs within
1e-6 absolute (both are fp32 graphs of the same weights; any real change to the
model or the export moves outputs by far more). With the same package versions as the
shipped manifest the graph files are byte-identical, and the test says so.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from export.bundle_writer import export_bundle  # noqa: E402
from export.graphs import ort_session, sample_inputs  # noqa: E402
from runtime.bundle import demo_bundle, read_manifest  # noqa: E402

TOL = 1e-6
SHAPES = {"text_encoder": [(1, None), (2, None)], "unet": [(1, None), (2, (6, 10))],
          "vae_decoder": [(1, None), (1, (6, 10))], "safety_checker": [(2, None)]}


@pytest.fixture(scope="module")
def fresh(demo_components, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "bundle"
    export_bundle(demo_components, out, log=lambda msg: None)
    return out


def test_manifest_matches_shipped(fresh):
    shipped, new = read_manifest(demo_bundle()), read_manifest(fresh)
    assert new.source == shipped.source  # same weights, bit for bit
    assert (new.hidden, new.profile, new.opset) == (shipped.hidden, shipped.profile, shipped.opset)
    assert (new.default_height, new.default_width) == (shipped.default_height, shipped.default_width)
    assert list(new.graphs) == list(shipped.graphs)
    for name, e in new.graphs.items():
        assert e.spec == shipped.graphs[name].spec
        if new.packages == shipped.packages:
            assert e.sha256 == shipped.graphs[name].sha256, f"{name}.onnx differs from the shipped one"


def test_files_match_shipped(fresh):
    for f in ("tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (fresh / f).read_bytes() == (demo_bundle() / f).read_bytes()
    new, old = (json.loads((b / "scheduler_config.json").read_text()) for b in (fresh, demo_bundle()))
    new.pop("_diffusers_version"), old.pop("_diffusers_version")
    assert new == old


@pytest.mark.parametrize("name", list(SHAPES))
def test_outputs_match_shipped(fresh, demo_components, name):
    spec = read_manifest(demo_bundle()).graphs[name].spec
    shipped, new = ort_session(demo_bundle() / spec.file), ort_session(fresh / spec.file)
    for batch, latent in SHAPES[name]:
        feed = {t.name: x.numpy() for t, x in
                zip(spec.inputs, sample_inputs(name, demo_components, batch, latent, seed=7), strict=True)}
        for a, b in zip(shipped.run(None, feed), new.run(None, feed), strict=True):
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=0, atol=TOL)

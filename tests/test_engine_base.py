"""The checks runtime.engine.Engine does once for every backend (ort-cpu and openvino
here; tensorrt through the fakes in test_tensorrt_backend.py)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import unavailable
from runtime.backends.openvino import OpenVinoEngine
from runtime.backends.ort import OrtEngine
from runtime.bundle import demo_bundle, read_manifest
from runtime.engine import EngineError, SpecMismatch

BUNDLE = demo_bundle()
MANIFEST = read_manifest(BUNDLE)
UNET = MANIFEST.graphs["unet"]
HIDDEN = int(UNET.spec.inputs[2].shape[2])  # C: the text width


def make(backend: str, graph=UNET, path=None):
    path = path or BUNDLE / graph.file
    if backend == "openvino":
        if unavailable("openvino"):
            pytest.skip("OpenVINO is not installed")
        return OpenVinoEngine(graph.spec, path, "fp32")
    return OrtEngine(graph.spec, path, "ort-cpu")


def shapes(n=2, h=8):
    return {"sample": (n, 4, h, h), "timestep": (1,), "encoder_hidden_states": (n, 77, HIDDEN)}


@pytest.fixture(params=["ort-cpu", "openvino"])
def engine(request):
    e = make(request.param)
    yield e
    e.release()


def test_lifecycle_order_is_enforced(engine):
    with pytest.raises(EngineError, match=r"allocate\(\) before load\(\)"):
        engine.allocate(shapes())
    engine.load()
    with pytest.raises(EngineError, match=r"run\(\) before allocate\(\)"):
        engine.run({})


def test_allocate_checks_names_rank_and_fixed_axes(engine):
    engine.load()
    with pytest.raises(EngineError, match="needs the shapes of exactly"):
        engine.allocate({"sample": (2, 4, 8, 8), "timestep": (1,)})
    with pytest.raises(EngineError, match="needs the shapes of exactly"):
        engine.allocate({**shapes(), "extra": (1,)})
    with pytest.raises(EngineError, match=r"input sample has shape \[2, 4, 8\]"):
        engine.allocate({**shapes(), "sample": (2, 4, 8)})
    with pytest.raises(EngineError, match="encoder_hidden_states has shape"):
        engine.allocate({**shapes(), "encoder_hidden_states": (2, 77, HIDDEN + 1)})  # C is fixed
    with pytest.raises(EngineError, match="sample has shape"):
        engine.allocate({**shapes(), "sample": (0, 4, 8, 8)})
    assert engine.shapes is None


def test_feeds_are_checked_and_every_input_must_be_given(engine):
    engine.load()
    engine.allocate(shapes())
    sample = np.zeros(shapes()["sample"], np.float32)
    t = np.ones(1, np.float32)
    with pytest.raises(EngineError, match="unknown input 'latent'"):  # not a raw KeyError
        engine.run({"sample": sample, "timestep": t, "latent": sample})
    with pytest.raises(EngineError, match=r"inputs \['encoder_hidden_states'\] were never given"):
        engine.run({"sample": sample, "timestep": t})  # would run on zeros
    with pytest.raises(EngineError, match="input sample is float64"):
        engine.run({"sample": sample.astype(np.float64)})
    engine.set_constant("encoder_hidden_states", np.ones(shapes()["encoder_hidden_states"], np.float32))
    out = engine.run({"sample": sample, "timestep": t})["noise_pred"]
    assert out.shape == shapes()["sample"] and np.isfinite(out).all()
    engine.allocate(shapes(n=1))  # new shapes: constants must be given again
    with pytest.raises(EngineError, match="never given"):
        engine.run({"sample": np.zeros(shapes(1)["sample"], np.float32), "timestep": t})
    engine.allocate(shapes(n=1))  # the same shapes: nothing forgotten or reallocated
    assert engine.given == {"sample", "timestep"}


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_a_graph_with_other_io_names_is_a_spec_mismatch(backend):
    e = make(backend, path=BUNDLE / MANIFEST.graphs["vae_decoder"].file)  # unet's spec
    with pytest.raises(SpecMismatch, match="do not match the manifest's"), e:
        e.load()

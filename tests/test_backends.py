"""Backend choice: explicit requests, `auto`, and auto's fallback when engines fail to load."""

import pytest

from runtime import backends
from runtime.engine import EngineError
from runtime.pipeline import Pipeline, UsageError


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="unknown backend"):
        backends.candidates("cuda")
    with pytest.raises(ValueError, match="backend tensorrt is not available here"):
        backends.candidates("tensorrt")  # no TensorRT on CPU machines
    assert backends.candidates("ort-cpu") == (["ort-cpu"], "requested")
    tries, why = backends.candidates("auto")
    assert tries[-1] == "ort-cpu" and why.startswith("auto")


def test_auto_falls_back_when_a_backend_cannot_load(monkeypatch):
    """E.g. TensorRT installed but no plans built yet: auto says so and uses the next one."""
    real = backends.EngineSet

    class FailingTensorRT(real):
        def __init__(self, backend, *args, **kwargs):
            if backend == "tensorrt":
                raise EngineError("tensorrt engine 'unet': no plan; build one with engines.build")
            super().__init__(backend, *args, **kwargs)

    monkeypatch.setattr(backends, "EngineSet", FailingTensorRT)
    monkeypatch.setattr(backends, "candidates", lambda r: (["tensorrt", "ort-cpu"], "auto"))
    lines = []
    with Pipeline("demo", "auto", log=lines.append) as pipe:
        assert pipe.backend == "ort-cpu"
    assert any("no plan" in x and "falling back to ort-cpu" in x for x in lines)


def test_auto_reports_a_corrupt_bundle_graph_instead_of_falling_back(tmp_path):
    """A damaged bundle graph fails on the first backend; auto checks that graph's hash
    and reports the bundle (BundleError) rather than trying the next backend on it."""
    import shutil

    from runtime.bundle import BundleError, demo_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    graph = bundle / "vae_decoder.onnx"
    graph.write_bytes(b"\x07garbage" + graph.read_bytes()[8:])  # same size, broken header
    lines = []
    with pytest.raises(BundleError, match=r"vae_decoder.onnx does not match its hash"):
        Pipeline(bundle, "auto", log=lines.append)
    assert not any("falling back" in x for x in lines), lines


def _failing_first(monkeypatch, error):
    """auto tries openvino, whose EngineSet raises `error`, then ort-cpu."""
    real = backends.EngineSet

    class Failing(real):
        def __init__(self, backend, *args, **kwargs):
            if backend == "openvino":
                raise error
            super().__init__(backend, *args, **kwargs)

    monkeypatch.setattr(backends, "EngineSet", Failing)
    monkeypatch.setattr(backends, "candidates", lambda r: (["openvino", "ort-cpu"], "auto"))


def test_a_backend_failure_on_an_intact_graph_falls_back(monkeypatch):
    """A compile or device failure on a graph that matches its hash is the backend's
    problem: auto falls back."""
    from runtime.bundle import demo_bundle

    e = EngineError("openvino engine 'unet': cannot compile")
    e.graph, e.source = "unet", demo_bundle() / "unet.onnx"
    _failing_first(monkeypatch, e)
    with Pipeline("demo", "auto") as pipe:
        assert pipe.backend == "ort-cpu" and pipe.load_report.fallbacks == [str(e)]


def test_a_damaged_cache_entry_is_reported_with_the_rebuild_command(monkeypatch, tmp_path):
    """Tensors that are not the graph's in a cached plan: not the bundle's fault (no
    'corrupt bundle'), not fallen back from: one line naming engines.build --force."""
    from runtime.engine import SpecMismatch

    e = SpecMismatch("tensorrt engine 'unet': plan inputs ['latent'] do not match")
    e.graph, e.source = "unet", tmp_path / "cache" / "unet.plan"
    _failing_first(monkeypatch, e)
    with pytest.raises(EngineError, match=r"damaged engine cache entry.*engines.build .* --force"):
        Pipeline("demo", "auto")


def test_load_report_and_step_hook():
    """The load and each step, as data: what the CLI prints and benchmarks read."""
    import numpy as np

    with Pipeline("demo", "ort-cpu", safety=False) as pipe:
        report = pipe.load_report
        assert report.backend == "ort-cpu" and report.precision == "fp32"
        assert set(report.graphs) == {"text_encoder", "unet", "vae_decoder"}  # vae_encoder: on first use
        assert all(g.seconds > 0 and g.cache in ("built", "hit") for g in report.graphs.values())
        seen = []

        def hook(i, t, latents):
            seen.append((i, t, latents.copy()))
            if i == 1:
                latents *= 0  # callback_on_step_end may change the latents in place

        r = pipe("x", steps=3, seed=1, on_step_end=hook)
        calls = len(r.request.schedule.timesteps)
        assert [s[0] for s in seen] == list(range(calls))
        assert [s[1] for s in seen] == [float(t) for t in r.request.schedule.timesteps]
        assert r.unet_calls.shape == r.step_ends.shape == (calls,) and (r.unet_calls > 0).all()
        assert (np.diff(r.step_ends) > 0).all()
        assert r.timings["unet"] == pytest.approx(r.unet_calls.sum())
        untouched = pipe("x", steps=3, seed=1)
        assert not np.array_equal(untouched.images, r.images)  # the hook's change took effect


def test_explicit_backend_does_not_fall_back():
    with pytest.raises(UsageError, match="not available"):
        Pipeline("demo", "ort-cuda")


def test_ort_cpu_cache_unwritable_or_damaged(tmp_path, monkeypatch):
    """A cache folder that cannot be written runs without the cache; a damaged cached
    graph of the right size is rebuilt from the bundle."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SDRT_CACHE_DIR", str(blocker / "cache"))  # under a file: ENOTDIR
    lines = []
    with Pipeline("demo", "ort-cpu", log=lines.append) as pipe:
        assert pipe("x", steps=1, seed=0).images.shape[0] == 1
    assert any("unet: loaded" in x and "engine cache: off" in x for x in lines), lines

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    Pipeline("demo", "ort-cpu").close()  # builds the cache
    [graph] = (tmp_path / "cache" / "ort-cpu").glob("unet-*/unet.onnx")
    graph.write_bytes(b"\0" * graph.stat().st_size)  # same size, garbage
    lines = []
    with Pipeline("demo", "ort-cpu", log=lines.append) as pipe:
        assert pipe("x", steps=1, seed=0).images.shape[0] == 1
    assert any("unet: loaded" in x and "engine cache: rebuilt" in x for x in lines), lines


def test_a_damaged_cpu_fused_graph_runs_the_bundles_graph_and_says_so(tmp_path, monkeypatch):
    """engines.build --backend ort-cpu's graph, damaged at the same size: ort-cpu runs the
    bundle's own graph (uncached) and the load report names the rebuild."""
    from engines.build import main

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path))
    assert main(["demo", "--backend", "ort-cpu", "--graphs", "unet"]) == 0
    [fused] = (tmp_path / "ort-cpu").glob("unet-*/unet.onnx")
    fused.write_bytes(b"\0" * fused.stat().st_size)
    with Pipeline("demo", "ort-cpu", safety=False) as pipe:
        status = pipe.load_report.graphs["unet"].cache
        assert status.startswith("built; the CPU-fused graph is damaged") and "--force" in status
        assert pipe("x", steps=1, seed=0).images.shape[0] == 1

"""`python -m engines.build --backend ort-cuda`: fp16 fused graphs in the engine cache.

Runs here on CPU (the optimizer needs no GPU). The text encoder and safety checker
graphs use only ops ONNX Runtime CPU has in fp16, so they run here and are compared
with the fp32 originals; the UNet and VAE get CUDA-only fused ops (NhwcConv), which
proves the fusions ran; they run in the gpu-marked test.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fakes.tiny_bundle import make_bundle

from engines.build import main
from runtime import cache
from runtime.bundle import read_manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    bundle = make_bundle(tmp_path_factory.mktemp("bundle"))
    cache_dir = tmp_path_factory.mktemp("cache")
    assert main([str(bundle), "--backend", "ort-cuda", "--cache-dir", str(cache_dir)]) == 0
    return bundle, cache_dir, read_manifest(bundle)


def test_every_graph_cached_and_found_by_the_runtime_key(built):
    bundle, cache_dir, manifest = built
    for name, entry in manifest.graphs.items():
        path = cache.lookup(cache.ort_cuda_key(entry), cache_dir)
        assert path is not None and path.name == f"{name}.onnx"
        model = onnx.load(str(path))
        weights = {numpy_dtype(t) for t in model.graph.initializer
                   if t.data_type in (1, 10) and np.prod(t.dims) > 4}  # not Resize scales
        assert weights == {"float16"}, f"{name} kept fp32 weights"
        io = [*model.graph.input, *model.graph.output]
        spec = {t.name: t.dtype for t in (*entry.spec.inputs, *entry.spec.outputs)}
        assert {i.name: onnx.helper.tensor_dtype_to_np_dtype(
            i.type.tensor_type.elem_type).name for i in io} == spec  # float32 I/O kept


def numpy_dtype(t: onnx.TensorProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name


def test_second_build_is_cached(built, capsys):
    bundle, cache_dir, _ = built
    capsys.readouterr()
    assert main([str(bundle), "--backend", "ort-cuda", "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out.count("cached ->") == 4


def test_unet_and_vae_fused(built):
    _, cache_dir, manifest = built
    for name in ("unet", "vae_decoder"):
        path = cache.lookup(cache.ort_cuda_key(manifest.graphs[name]), cache_dir)
        ops = {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}
        assert ("com.microsoft", "NhwcConv") in ops, ops


@pytest.mark.parametrize("name,feed", [
    ("text_encoder", lambda rng: {"input_ids": rng.integers(0, 49408, (2, 77)).astype(np.int32)}),
    ("safety_checker", lambda rng: {"clip_input": rng.standard_normal(
        (2, 3, 224, 224)).astype(np.float32)}),
])
def test_fp16_graph_matches_fp32_on_cpu(built, name, feed):
    bundle, cache_dir, manifest = built
    path = cache.lookup(cache.ort_cuda_key(manifest.graphs[name]), cache_dir)
    feeds = feed(np.random.default_rng(0))
    cpu = ["CPUExecutionProvider"]
    want = ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=cpu).run(None, feeds)
    got = ort.InferenceSession(str(path), providers=cpu).run(None, feeds)
    for w, g in zip(want, got, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        if w.dtype == np.float32:  # fp16 weights and math: ~1e-3 relative
            np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_ort_cuda_engine_runs_the_artifacts(built):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is not available here")
    from runtime.backends.ort import OrtEngine

    bundle, cache_dir, manifest = built
    entry = manifest.graphs["unet"]
    shapes = {"sample": (2, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (2, 77, 8)}
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    path = cache.lookup(cache.ort_cuda_key(entry), cache_dir)
    want = ort.InferenceSession(str(bundle / "unet.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with OrtEngine(entry.spec, path, "ort-cuda") as e:
        e.load()
        e.allocate(shapes)
        got = e.run(feeds)["noise_pred"]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_attention_fusion_failure_falls_back_with_a_warning(built, tmp_path, monkeypatch):
    """onnxruntime 1.31's UNet attention fusion raises TypeError under numpy 2.4
    (int() of a 1-element array): the graph is still built, without that fusion."""
    from engines import ort_cuda

    real = ort_cuda._optimize
    calls = []

    def flaky(path, model_type, attention):
        calls.append(attention)
        if attention:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return real(path, model_type, attention)

    monkeypatch.setattr(ort_cuda, "_optimize", flaky)
    warnings = []
    bundle = built[0]
    out = ort_cuda.optimize_fp16(bundle / "unet.onnx", tmp_path, "unet", False, warnings.append)
    assert out.is_file() and calls == [True, False]
    assert len(warnings) == 1 and "attention fusion failed" in warnings[0]

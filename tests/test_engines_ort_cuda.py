"""`python -m engines.build --backend ort-cuda`: fp16 fused graphs in the engine cache.

Runs here on CPU (the optimizer needs no GPU). The text encoder and safety checker
graphs use only ops ONNX Runtime CPU has in fp16, so they run here and are compared
with the fp32 originals; the UNet and VAE get CUDA-only fused ops (NhwcConv), which
proves the fusions ran; they run in the gpu-marked test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fakes.tiny_bundle import make_bundle

from engines.build import main
from runtime import cache
from runtime.bundle import read_manifest
from runtime.engine import EngineError


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

    def flaky(path, model_type, attention, bias_split_gelu=True, cpu=False):
        calls.append(attention)
        if attention:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return real(path, model_type, attention, bias_split_gelu, cpu)

    monkeypatch.setattr(ort_cuda, "_optimize", flaky)
    warnings = []
    bundle = built[0]
    out = ort_cuda.optimize_fp16(bundle / "unet.onnx", tmp_path, "unet", False, warnings.append)
    assert out.is_file() and calls == [True, False]
    assert len(warnings) == 1 and "attention fusion failed" in warnings[0]


def test_unet_attention_fused_under_any_numpy(tmp_path):
    """The demo UNet has 14 attention blocks (7 self, 7 cross); onnxruntime's own fusion
    fused none of them under numpy >= 2.4 (int() of a one-element array)."""
    from collections import Counter

    from engines import ort_cuda

    logged = []
    demo = Path(__file__).resolve().parent.parent / "runtime" / "demo_bundle"
    out = ort_cuda.optimize_fp16(demo / "unet.onnx", tmp_path, "unet", False,
                                 warn=pytest.fail, log=logged.append)
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node if n.domain == "com.microsoft")
    assert ops["MultiHeadAttention"] == 14, ops
    assert len(logged) == 1 and "14 MultiHeadAttention" in logged[0]
    # its feed-forward widths are not ones the CUDA BiasSplitGelu kernel runs (it failed
    # on an H200 at run time): left unfused
    assert ops["BiasSplitGelu"] == 0


UNET_SHAPES = (  # the tiny test bundle's (hidden 8)
    {"sample": (2, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (2, 77, 8)},
    {"sample": (2, 4, 8, 24), "timestep": (1,), "encoder_hidden_states": (2, 77, 8)})
# the shipped demo's UNet (text width 32)
DEMO_UNET_SHAPES = {"sample": (2, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (2, 77, 32)}


def _unet_feeds(shapes, rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_device_bindings_keep_one_binding_per_shape(built):
    """The ort-cuda bookkeeping (buffers per shape, graph ids, copies back to host) on a
    CPU session: same answers as a plain run, a shape seen before gets its own binding
    (and CUDA graph id) back, shapes past MAX_GRAPHS share one plain binding."""
    from runtime.backends import ort_cuda

    bundle, _, manifest = built
    spec = manifest.graphs["unet"].spec
    session = ort.InferenceSession(str(bundle / "unet.onnx"), providers=["CPUExecutionProvider"])
    bindings = ort_cuda.DeviceBindings(session, spec, cuda_graph=True, device="cpu", max_graphs=1)
    rng = np.random.default_rng(0)
    seen = []
    for shapes in (*UNET_SHAPES, UNET_SHAPES[0]):
        b = bindings.get(shapes)
        seen.append((b.graph_id, id(b)))
        for _ in range(2):
            feeds = _unet_feeds(shapes, rng)
            for name, a in feeds.items():
                b.copy_in(name, a)
            got = b.run(session)["noise_pred"]
            want = session.run(None, feeds)[0]
            np.testing.assert_array_equal(got, want)
            assert got is b.outputs["noise_pred"]  # the host buffer, reused
    assert [g for g, _ in seen] == [0, -1, 0] and seen[0][1] == seen[2][1]


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph,max_graphs", [(False, 4), (True, 4), (True, 1)],
                         ids=["plain", "cuda-graph", "past-max-graphs"])
def test_ort_cuda_unet_steps_match_cpu(built, cuda_graph, max_graphs):
    """Several steps at two shapes and back (a captured graph replayed with new inputs
    each step) against the fp32 graph on the CPU. fp16 on the GPU: errors scale with the
    largest output (hundreds here; fp16 keeps ~3 digits), so atol = 2e-3 x max|want|."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is not available here")
    from runtime.backends.ort import OrtEngine

    bundle, cache_dir, manifest = built
    entry = manifest.graphs["unet"]
    path = cache.lookup(cache.ort_cuda_key(entry), cache_dir)
    cpu = ort.InferenceSession(str(bundle / "unet.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    with OrtEngine(entry.spec, path, "ort-cuda", cuda_graph=cuda_graph, max_graphs=max_graphs) as e:
        e.load()
        assert e.cuda_graph_status == ("on" if cuda_graph else "off"), e.cuda_graph_status
        for shapes in (*UNET_SHAPES, UNET_SHAPES[0]):
            e.allocate(shapes)
            feeds = _unet_feeds(shapes, rng)
            e.set_constant("encoder_hidden_states", feeds["encoder_hidden_states"])
            for _ in range(4):  # ORT captures after its warm-up runs, then replays
                feeds["sample"] = rng.standard_normal(shapes["sample"]).astype(np.float32)
                feeds["timestep"] = rng.uniform(0, 999, (1,)).astype(np.float32)
                got = e.run({k: feeds[k] for k in ("sample", "timestep")})["noise_pred"]
                want = cpu.run(None, feeds)[0]
                np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-3 * np.abs(want).max())
        if cuda_graph:  # past max_graphs: the second shape runs without a graph
            assert len(e.device.graphs) == min(2, max_graphs)
        assert e.device.memcpy is not None  # outputs copied without allocating


@pytest.mark.gpu
def test_demo_pipeline_on_ort_cuda(tmp_path, monkeypatch):
    """The whole pipeline on the GPU (demo bundle, fp16 graphs): CUDA graph on and off
    give the same picture (<= 1/255), and fp16 stays near ort-cpu's fp32 (H200, onnxruntime-gpu
    1.30: max 1/255, mean 0.053/255; bounds max 3, mean 0.5)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is not available here")
    from engines.build import main as build
    from runtime.pipeline import Pipeline

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path))
    assert build(["demo", "--backend", "ort-cuda"]) == 0
    kw = {"steps": 10, "scheduler": "pndm", "seed": 3, "height": 128, "width": 128}
    images = {}
    for name, backend, graph in (("graph", "ort-cuda", True), ("plain", "ort-cuda", False),
                                 ("cpu", "ort-cpu", False)):
        log = []
        with Pipeline("demo", backend, cuda_graph=graph, log=log.append) as pipe:
            images[name] = pipe("a red apple", **kw).images.astype(np.int16)
        if backend == "ort-cuda":
            assert any("unet:" in m and "engine cache: hit" in m for m in log), log
    assert np.abs(images["graph"] - images["plain"]).max() <= 1
    diff = np.abs(images["graph"] - images["cpu"])
    print(f"fp16 GPU vs fp32 CPU: max {diff.max()}, mean {diff.mean():.3f} (of 255)")
    assert diff.max() <= 3 and diff.mean() <= 0.5


def test_device_bindings_bind_weight_inputs(tmp_path, monkeypatch):
    """ort-cuda's LoRA path on a CPU session: the LoRA-ready UNet's weights bound to every
    binding as shared OrtValues; update_inplace (what a swap does on the GPU) changes
    what the next run computes, at the same address, as set_weights does on ort-cpu."""
    from benchmarks.lora_swap import random_lora
    from runtime.backends import ort_cuda
    from runtime.bundle import demo_bundle
    from runtime.pipeline import Pipeline

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    random_lora(demo_bundle(), a, 4, 1)
    random_lora(demo_bundle(), b, 4, 2)
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as pipe:
        pipe.set_loras([(a, 40.0)])
        unet = pipe.engines["unet"]
        weights = {n: ort.OrtValue.ortvalue_from_numpy(w.copy()) for n, w in unet.weights.items()}
        bindings = ort_cuda.DeviceBindings(unet.session, unet.spec, cuda_graph=True, device="cpu",
                                           weights=weights)
        shapes = DEMO_UNET_SHAPES
        feeds = _unet_feeds(shapes, np.random.default_rng(0))
        binding = bindings.get(shapes)
        for name, x in feeds.items():
            binding.copy_in(name, x)
        unet.allocate(shapes)
        assert np.array_equal(binding.run(unet.session)["noise_pred"], unet.run(feeds)["noise_pred"])
        pipe.set_loras([(b, 40.0)])  # in place on ort-cpu; update_inplace on the bindings
        addresses = {n: v.data_ptr() for n, v in weights.items()}
        for name, value in weights.items():
            value.update_inplace(unet.weights[name])
        assert {n: v.data_ptr() for n, v in weights.items()} == addresses
        assert np.array_equal(binding.run(unet.session)["noise_pred"], unet.run(feeds)["noise_pred"])


@pytest.mark.gpu
def test_demo_loras_on_ort_cuda(tmp_path, monkeypatch, capsys):
    """Run-time LoRAs on ort-cuda: the LoRA-ready fp32 graph, its weights on the GPU,
    swapped in place under the CUDA graph. Near ort-cpu's image with the same LoRA,
    A -> B -> A gives A's image bit for bit, [] the bundle's engine again; prints the
    swap times."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is not available here")
    import time

    from benchmarks.lora_swap import random_lora
    from runtime.bundle import demo_bundle
    from runtime.pipeline import Pipeline

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    random_lora(demo_bundle(), a, 4, 1)
    random_lora(demo_bundle(), b, 4, 2)
    kw = {"steps": 5, "scheduler": "euler", "seed": 4, "height": 128, "width": 128}
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as cpu:
        cpu.set_loras([(a, 40.0)])
        want = cpu("a red apple", **kw).images.astype(np.int16)
    times = {}
    with Pipeline(demo_bundle(), "ort-cuda", safety=False) as pipe:
        base = pipe("a red apple", **kw).images.astype(np.int16)
        for label, loras in (("A", [(a, 40.0)]), ("B", [(b, 40.0)]), ("A again", [(a, 40.0)])):
            t = time.perf_counter()
            pipe.set_loras(loras)
            times[label] = time.perf_counter() - t
            got = pipe("a red apple", **kw).images.astype(np.int16)
            if label == "A":
                img_a = got
                assert pipe.engines["unet"].device_weights is not None
        assert np.array_equal(got, img_a)  # A -> B -> A, the same session and graph
        pipe.set_loras([])
        plain = pipe("a red apple", **kw).images.astype(np.int16)
    diff = np.abs(img_a - want)
    with capsys.disabled():
        print(f"\nort-cuda LoRA vs ort-cpu: max {diff.max()}, mean {diff.mean():.3f} (of 255); "
              f"swaps {', '.join(f'{k} {v:.3f} s' for k, v in times.items())}")
    assert np.abs(img_a - base).max() > 10 and diff.max() <= 3 and diff.mean() <= 0.5
    assert np.abs(plain - base).max() <= 1


def test_the_ort_cuda_lora_ready_graph_is_the_bundles_with_weights_as_inputs(tmp_path, monkeypatch):
    """Built here without a GPU (no ORT optimizer: the session on the GPU applies its
    own): the bundle's UNet, each mapped weight a graph input; fed the bundle's weights,
    it computes what the bundle's graph does."""
    from runtime.backends.ort import OrtEngine
    from runtime.bundle import demo_bundle, read_manifest
    from runtime.lora_apply import all_params, lora_weights

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    bundle = demo_bundle()
    manifest = read_manifest(bundle)
    entry = manifest.graphs["unet"]
    weights = lora_weights(bundle, manifest, [], {"unet": all_params(manifest)["unet"]})["unet"]
    engine = OrtEngine(entry.spec, bundle / entry.file, "ort-cuda",
                       cache_key=cache.ort_cuda_lora_key(entry), weights=weights)
    path = engine._cached_graph()
    assert path is not None and engine.cache_status.startswith("built"), engine.cache_status
    ready = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert set(weights) <= {i.name for i in ready.get_inputs()}
    feeds = _unet_feeds(DEMO_UNET_SHAPES, np.random.default_rng(3))
    plain = ort.InferenceSession(str(bundle / entry.file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ready.run(None, {**feeds, **weights})[0], plain.run(None, feeds)[0],
                               rtol=1e-5, atol=1e-5)


def _embedding_files(folder: Path, width: int) -> list[Path]:
    """Two diffusers-format embeddings (one vector, three) for the demo's width."""
    from safetensors.numpy import save_file

    rng, out = np.random.default_rng(11), []
    for name, token, rows in (("one", "<red-thing>", 1), ("three", "<big-style>", 3)):
        save_file({token: rng.standard_normal((rows, width), np.float32) * 0.5},
                  str(folder / f"{name}.safetensors"))
        out.append(folder / f"{name}.safetensors")
    return out


EMBEDDING_PROMPT = "a photo of <red-thing> riding a horse, <big-style> style"


def test_device_bindings_take_a_grown_token_table(tmp_path, monkeypatch):
    """ort-cuda's textual inversion on a CPU session: the LoRA-ready text encoder's token
    table grows [V + k, C] (a new device buffer, new bindings: replace_weight), and the
    bindings then compute what ort-cpu's engine does with the same table."""
    from runtime.backends import ort_cuda
    from runtime.bundle import demo_bundle
    from runtime.pipeline import Pipeline

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    one, three = _embedding_files(tmp_path, read_manifest(demo_bundle()).hidden)
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as pipe:
        pipe.set_embeddings([one])
        enc = pipe.engines["text_encoder"]
        table = pipe._table_name()
        assert table in enc.tables
        weights = {n: ort.OrtValue.ortvalue_from_numpy(w.copy()) for n, w in enc.weights.items()}
        bindings = ort_cuda.DeviceBindings(enc.session, enc.spec, cuda_graph=False, device="cpu",
                                           weights=weights)
        shapes = {"input_ids": (1, 77)}

        def both(prompt):
            ids = pipe.tokenizer.encode([prompt])[0].astype(enc.spec.inputs[0].dtype)
            binding = bindings.get(shapes)
            binding.copy_in("input_ids", ids)
            enc.allocate(shapes)
            got = binding.run(enc.session)["last_hidden_state"]
            return got, enc.run({"input_ids": ids})["last_hidden_state"]

        got, want = both(EMBEDDING_PROMPT)
        assert np.array_equal(got, want)
        want_one = want
        pipe.set_embeddings([one, three])  # 1 + 3 rows more than the bundle's table
        old = bindings.weights[table].data_ptr()
        bindings.replace_weight(table, enc.weights[table])
        assert bindings.weights[table].shape() == list(enc.weights[table].shape)
        assert bindings.weights[table].data_ptr() != old and not bindings.graphs
        got, want = both(EMBEDDING_PROMPT)
        assert np.array_equal(got, want)
        with pytest.raises(KeyError):
            bindings.replace_weight("no-such-weight", enc.weights[table])
        # the engine wired as on ort-cuda (its weights in OrtValues bound per shape): a
        # set with fewer rows goes through set_weights -> replace_weight, one dict
        enc.device = ort_cuda.DeviceBindings(enc.session, enc.spec, cuda_graph=False, device="cpu",
                                             weights={n: ort.OrtValue.ortvalue_from_numpy(w)
                                                      for n, w in enc.weights.items()})
        enc.device_weights = enc.device.weights
        enc.shapes = None
        pipe.set_embeddings([one])
        assert enc.device_weights is enc.device.weights
        assert enc.device.weights[table].shape() == list(enc.weights[table].shape)
        ids = pipe.tokenizer.encode([EMBEDDING_PROMPT])[0].astype(enc.spec.inputs[0].dtype)
        enc.allocate(shapes)
        assert enc.current is not None  # ran through the device bindings
        assert np.array_equal(enc.run({"input_ids": ids})["last_hidden_state"], want_one)
        # the upload fails (device memory): one line, and nothing has changed
        before = (enc.device.weights[table], enc.weights[table], enc.shapes, enc.device.plain)

        def no_memory(*args, **kwargs):
            raise RuntimeError("CUDA out of memory\n(more lines)")

        monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", no_memory)
        grown = np.zeros((enc.weights[table].shape[0] + 3, enc.weights[table].shape[1]), np.float32)
        with pytest.raises(EngineError, match="cannot put weight .* on the GPU: CUDA out of memory at") as e:
            enc.set_weights({table: grown})
        assert "\n" not in str(e.value)
        monkeypatch.undo()
        assert (enc.device.weights[table], enc.weights[table], enc.shapes, enc.device.plain) == before
        graphs = ort_cuda.DeviceBindings(enc.session, enc.spec, cuda_graph=True, device="cpu",
                                         weights=weights)
        with pytest.raises(ValueError, match="CUDA graphs"):
            graphs.replace_weight(table, enc.weights[table])


@pytest.mark.gpu
def test_demo_embeddings_on_ort_cuda(tmp_path, monkeypatch, capsys):
    """Textual inversion on ort-cuda: the LoRA-ready fp32 text encoder, its token table
    grown on the GPU (one, then four extra rows), with a LoRA on the UNet and the text
    encoder set after the embeddings and before a smaller set; near ort-cpu's image with
    the same files, and [] gives the bundle's picture back."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is not available here")
    from benchmarks.lora_swap import random_lora
    from runtime.bundle import demo_bundle
    from runtime.pipeline import Pipeline

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    one, three = _embedding_files(tmp_path, read_manifest(demo_bundle()).hidden)
    lora = tmp_path / "a.safetensors"
    random_lora(demo_bundle(), lora, 4, 1, ("unet", "text_encoder"))
    kw = {"steps": 5, "scheduler": "euler", "seed": 4, "height": 128, "width": 128}
    images: dict[str, dict[str, np.ndarray]] = {}
    for backend in ("ort-cpu", "ort-cuda"):
        got = images[backend] = {}
        with Pipeline(demo_bundle(), backend, safety=False) as pipe:
            got["base"] = pipe(EMBEDDING_PROMPT, **kw).images.astype(np.int16)
            pipe.set_embeddings([one])
            got["one"] = pipe(EMBEDDING_PROMPT, **kw).images.astype(np.int16)
            pipe.set_embeddings([one, three])
            got["both"] = pipe(EMBEDDING_PROMPT, **kw).images.astype(np.int16)
            pipe.set_loras([(lora, 40.0)])
            got["lora"] = pipe(EMBEDDING_PROMPT, **kw).images.astype(np.int16)
            pipe.set_embeddings([three])  # fewer rows, the LoRA stays
            got["lora three"] = pipe(EMBEDDING_PROMPT, **kw).images.astype(np.int16)
            pipe.set_loras([])
            pipe.set_embeddings([])
            got["none"] = pipe(EMBEDDING_PROMPT, **kw).images.astype(np.int16)
    cpu, gpu = images["ort-cpu"], images["ort-cuda"]
    diffs = {k: np.abs(gpu[k] - cpu[k]) for k in cpu}
    with capsys.disabled():
        print("\nort-cuda embeddings vs ort-cpu: " + ", ".join(
            f"{k} max {d.max()} mean {d.mean():.3f}" for k, d in diffs.items()))
    assert np.abs(gpu["both"] - gpu["base"]).max() > 10  # the words changed the picture
    for d in diffs.values():
        assert d.max() <= 3 and d.mean() <= 0.5
    assert np.abs(gpu["none"] - gpu["base"]).max() <= 1

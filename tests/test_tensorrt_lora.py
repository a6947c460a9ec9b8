"""Run-time LoRAs on TensorRT, through the fakes (tests/fakes/gpu.py): refittable plans
(engines.build --refit) refitted by ONNX initializer name from the manifest's weight
map; A -> B -> A leaves A's weights exactly, [] the plan's own; a plan swapped in later
(another profile) gets the same weights; a plan that is not refittable, or a TensorRT
that cannot read the weights it fused with ours, is one line and nothing changes."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import pytest
from fakes.gpu import FakeGPU
from fakes.tiny_bundle import make_bundle
from safetensors.numpy import save_file

from engines.build import main as build
from runtime.bundle import WeightRef, demo_bundle, read_manifest
from runtime.engine import EngineError
from runtime.pipeline import Pipeline, UsageError


@pytest.fixture(params=["10.3.0", "8.6.1"])
def gpu(request, monkeypatch):
    return FakeGPU(request.param).install(monkeypatch)


def offset(path, name) -> int:
    """Where initializer `name`'s float32 bytes are: in its external data file, or inline."""
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == name)
    if t.external_data:
        return int({e.key: e.value for e in t.external_data}.get("offset", 0))
    return path.read_bytes().find(t.raw_data)


def mapped_bundle(folder, bias=False):
    """The tiny bundle with a weight map, as export writes one: the UNet's conv kernel
    (a LoRA target) and the text encoder's token table; `bias`: the conv's bias too
    (which the fake plans fuse with its kernel)."""
    bundle = make_bundle(folder)
    for extra in ("tokenizer", "scheduler_config.json"):
        src = demo_bundle() / extra
        (shutil.copytree if src.is_dir() else shutil.copy)(src, bundle / extra)
    m = read_manifest(bundle)
    conv = WeightRef("conv_w", False, "unet.onnx.data",
                     offset(bundle / "unet.onnx", "conv_w"), (4, 4, 3, 3))
    emb = WeightRef("emb", False, "text_encoder.onnx",
                    offset(bundle / "text_encoder.onnx", "emb"), (49408, 8))
    unet = {"conv_in.weight": conv}
    if bias:
        unet["conv_in.bias"] = WeightRef("conv_b", False, "unet.onnx.data",
                                         offset(bundle / "unet.onnx", "conv_b"), (4,))
    graphs = {**m.graphs,
              "unet": dataclasses.replace(m.graphs["unet"], weights=unet),
              "text_encoder": dataclasses.replace(
                  m.graphs["text_encoder"], weights={"embeddings.token_embedding.weight": emb})}
    dataclasses.replace(m, graphs=graphs).write(bundle)
    return bundle


def lora(path, seed):
    rng = np.random.default_rng(seed)
    save_file({"unet.conv_in.lora_A.weight": rng.standard_normal((2, 4, 3, 3)).astype(np.float32),
               "unet.conv_in.lora_B.weight": rng.standard_normal((4, 2, 1, 1)).astype(np.float32)},
              str(path))
    return path


def latents(pipe, size=128, guidance=1.0):
    """The final latents [1, 4, h, w] (the fake VAE's pictures are all white)."""
    seen = []
    pipe("x", steps=2, height=size, width=size, seed=0, guidance_scale=guidance,
         on_step_end=lambda i, t, x: seen.append(x.copy()))
    return seen[-1]


def test_loras_refit_the_plans_and_swap_exactly(gpu, tmp_path, monkeypatch):
    bundle = mapped_bundle(tmp_path / "bundle")
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    assert build([str(bundle), "--backend", "tensorrt", "--refit"]) == 0
    a, b = lora(tmp_path / "a.safetensors", 1), lora(tmp_path / "b.safetensors", 2)
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        unet = pipe.engines["unet"]
        base = latents(pipe)
        if gpu.trt < (10, 0):
            # the fake plan fused the conv's kernel with its bias, which the bundle does
            # not map, and 8.6 has no OnnxParserRefitter to read it from the graph
            with pytest.raises(EngineError, match="more weights to refit") as e:
                pipe.set_loras([(a, 1.0)])
            assert "\n" not in str(e.value) and pipe.loras == []
            assert unet.engine.shift() == 0.0 and np.array_equal(latents(pipe), base)
            return
        pipe.set_loras([(a, 1.0)])
        assert gpu.calls("refit_from_file")  # the bias from the bundle's graph
        img_a, shift_a = latents(pipe), unet.engine.shift()
        assert shift_a != 0.0 and not np.array_equal(img_a, base)
        pipe.set_loras([(b, 0.5), (a, -0.3)])
        assert unet.engine.shift() not in (0.0, shift_a)
        pipe.set_loras([(a, 1.0)])
        assert unet.engine.shift() == shift_a and np.array_equal(latents(pipe), img_a)
        assert pipe.engines["unet"] is unet  # refitted in place: no plan reloaded
        # a plan deserialized later for other shapes gets the LoRA weights too
        assert build([str(bundle), "--backend", "tensorrt", "--refit", "--static",
                      "--opt", "1x64x64"]) == 0
        dynamic, loads = unet.path, len(gpu.calls("deserialize_cuda_engine"))
        latents(pipe, 64, guidance=7.5)  # UNet batch 2 at 64x64: the static plan's shape
        assert unet.path != dynamic and len(gpu.calls("deserialize_cuda_engine")) > loads
        assert unet.engine.shift() == shift_a
        pipe.set_loras([])
        assert unet.engine.shift() == 0.0 and np.array_equal(latents(pipe), base)


def test_plain_and_refittable_plans_side_by_side(gpu, tmp_path, monkeypatch):
    """The runtime prefers plain plans (faster); LoRAs move it to the refittable ones,
    and keep it there: a plain plan built later is not swapped in. Fused weights the
    map has come from it (8.6 too, without OnnxParserRefitter)."""
    bundle = mapped_bundle(tmp_path / "bundle", bias=True)
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    assert build([str(bundle), "--backend", "tensorrt"]) == 0
    assert build([str(bundle), "--backend", "tensorrt", "--refit"]) == 0
    a = lora(tmp_path / "a.safetensors", 1)
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        unet = pipe.engines["unet"]
        base = latents(pipe)
        assert not unet.engine.refittable
        pipe.set_loras([(a, 1.0)])
        assert unet.engine.refittable and not gpu.calls("refit_from_file")  # the map sufficed
        img_a, shift_a = latents(pipe), unet.engine.shift()
        assert shift_a != 0.0
        assert build([str(bundle), "--backend", "tensorrt", "--static", "--opt", "1x64x64"]) == 0
        latents(pipe, 64, guidance=7.5)  # a plain static plan fits: not taken with LoRAs
        assert unet.engine.refittable and unet.engine.shift() == shift_a
        assert np.array_equal(latents(pipe), img_a)

        # TensorRT gives up halfway: every plan read from its file again, no LoRA
        real = gpu.tensorrt.Refitter
        refitters = []

        def failing(engine, logger):
            r = real(engine, logger)
            r.refit_cuda_engine = lambda: False
            refitters.append(r)
            return r

        monkeypatch.setattr(gpu.tensorrt, "Refitter", failing)
        with pytest.raises(EngineError, match="refit failed.*own weights") as e:
            pipe.set_loras([(lora(tmp_path / "b.safetensors", 2), 1.0)])
        assert "\n" not in str(e.value) and refitters and pipe.loras == []
        monkeypatch.setattr(gpu.tensorrt, "Refitter", real)
        assert unet.engine.shift() == 0.0 and np.array_equal(latents(pipe), base)


def test_a_plan_that_is_not_refittable_is_one_line(gpu, tmp_path, monkeypatch):
    bundle = mapped_bundle(tmp_path / "bundle")
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    assert build([str(bundle), "--backend", "tensorrt"]) == 0
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        base = latents(pipe)
        with pytest.raises(EngineError, match="not refittable.*--refit") as e:
            pipe.set_loras([(lora(tmp_path / "a.safetensors", 1), 1.0)])
        assert "\n" not in str(e.value) and pipe.loras == []
        assert np.array_equal(latents(pipe), base)  # the plain plans run on


def embedding(folder, token, rows, seed):
    path = folder / f"{token.strip('<>')}.safetensors"
    rng = np.random.default_rng(seed)
    save_file({token: rng.standard_normal((rows, 8)).astype(np.float32)}, str(path))
    return path


def test_embeddings_refit_the_rows_the_text_encoder_plan_keeps(gpu, tmp_path, monkeypatch):
    """Textual inversion on TensorRT: `--refit` builds the text encoder from its graph
    with TABLE_ROWS zero rows after the token table (kept beside the plan for the parser
    refitter); set_embeddings refits the grown table there, [] the plan's own weights.
    Plain plans only: one line naming --refit, and nothing changes."""
    from runtime.embeddings import TABLE_ROWS

    bundle = mapped_bundle(tmp_path / "bundle")
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    one = embedding(tmp_path, "<thing>", 1, 1)
    three = embedding(tmp_path, "<style>", 3, 2)
    model = onnx.load(str(bundle / "text_encoder.onnx"))
    table = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "emb"))
    assert build([str(bundle), "--backend", "tensorrt"]) == 0
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        base = latents(pipe)
        with pytest.raises(EngineError, match="keeps no token-table rows.*--refit") as e:
            pipe.set_embeddings([one])
        assert "\n" not in str(e.value) and pipe.embeddings == []
        assert pipe.tokenizer.tokenizer.token_to_id("<thing>") is None
        assert np.array_equal(latents(pipe), base)
    assert build([str(bundle), "--backend", "tensorrt", "--refit"]) == 0
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        enc = pipe.engines["text_encoder"]
        assert not enc.engine.refittable  # plain plans first: faster
        pipe.set_embeddings([one, three])
        assert enc.engine.refittable and enc.table_rows == TABLE_ROWS
        size, total = enc.engine.weights["emb"]
        assert size == (table.shape[0] + TABLE_ROWS) * 8
        from safetensors.numpy import load_file

        added = sum(float(v.astype(np.float64).sum()) for p in (one, three)
                    for v in load_file(str(p)).values())
        assert total == pytest.approx(float(table.astype(np.float64).sum()) + added, abs=1e-3)
        assert pipe.tokenizer.tokenizer.token_to_id("<thing>") == table.shape[0]
        kept = enc.refit_graph(bundle / "text_encoder.onnx")
        assert kept.parent == enc.path.parent and kept.name == "text_encoder.onnx"
        grown = next(t for t in onnx.load(str(kept)).graph.initializer if t.name == "emb")
        assert list(grown.dims) == [table.shape[0] + TABLE_ROWS, 8]
        if gpu.trt >= (10, 0):  # 8.6 cannot refit this UNet (see above)
            pipe.set_loras([(lora(tmp_path / "a.safetensors", 1), 1.0)])  # the table stays
            assert enc.engine.weights["emb"][1] == total
            pipe.set_loras([])
        pipe.set_embeddings([])  # no LoRA on it: the plan's own weights
        assert enc.engine.shift() == 0.0 and pipe.embeddings == []
        many = [embedding(tmp_path, f"<w{i}>", 75, i) for i in range(4)]  # 300 > TABLE_ROWS
        with pytest.raises(UsageError, match=f"keeps {TABLE_ROWS} rows"):
            pipe.set_embeddings(many)
        assert np.array_equal(latents(pipe), base)


def test_the_grown_text_encoder_computes_the_bundles(tmp_path):
    """engines/table_rows.py on the demo's text encoder: the table [V, C] grown to
    [V + 16, C] with zeros, every other weight as it was; ORT gives the same output for
    the same ids."""
    import onnxruntime as ort

    from engines.table_rows import with_table_rows
    from runtime.embeddings import TOKEN_TABLE

    bundle = demo_bundle()
    entry = read_manifest(bundle).graphs["text_encoder"]
    name = entry.weights[TOKEN_TABLE].initializer
    out = with_table_rows(bundle / entry.file, name, 16, tmp_path / "text_encoder.onnx")
    grown = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    own = {t.name: onnx.numpy_helper.to_array(t)
           for t in onnx.load(str(bundle / entry.file)).graph.initializer}
    assert grown.keys() == own.keys()
    assert grown[name].shape == (own[name].shape[0] + 16, own[name].shape[1])
    assert np.array_equal(grown[name][:len(own[name])], own[name]) and not grown[name][len(own[name]):].any()
    ids = np.random.default_rng(0).integers(0, own[name].shape[0], (2, 77)).astype(entry.spec.inputs[0].dtype)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
           for p in (bundle / entry.file, out)]
    assert np.array_equal(run[0], run[1])
    with pytest.raises(ValueError, match="no initializer"):
        with_table_rows(bundle / entry.file, "nope", 16, tmp_path / "x.onnx")


TE_Q = "text_model.encoder.layers.0.self_attn.q_proj.weight"


def te_bundle(folder):
    """The tiny bundle whose text encoder gathers from a mapped token table and has a
    mapped LoRA target (q_w) that the fake plans fuse with an unmapped weight, so a text
    encoder LoRA on TensorRT 10 needs the parser refitter."""
    from fakes.tiny_bundle import HIDDEN, VOCAB, _model
    from onnx import helper

    from runtime.bundle import graph_spec, sha256_file

    bundle = mapped_bundle(folder)
    spec = graph_spec("text_encoder", HIDDEN)
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("Add", ["q_w", "q_extra"], ["w"]),  # fused: q_w + an unmapped one
             helper.make_node("MatMul", ["x", "w"], ["last_hidden_state"])]
    inits = {"emb": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
             "q_w": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
             "q_extra": np.zeros((HIDDEN, HIDDEN), np.float32)}
    path = bundle / spec.file
    onnx.save(_model(spec, nodes, inits), str(path))
    m = read_manifest(bundle)
    weights = {"embeddings.token_embedding.weight":
               WeightRef("emb", False, spec.file, offset(path, "emb"), (VOCAB, HIDDEN)),
               TE_Q: WeightRef("q_w", True, spec.file, offset(path, "q_w"), (HIDDEN, HIDDEN))}
    te = dataclasses.replace(m.graphs["text_encoder"], sha256=sha256_file(path), weights=weights)
    dataclasses.replace(m, graphs={**m.graphs, "text_encoder": te}).write(bundle)
    return bundle


def te_lora(path, seed):
    rng, module = np.random.default_rng(seed), f"text_encoder.{TE_Q.removesuffix('.weight')}"
    save_file({f"{module}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
               f"{module}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32)}, str(path))
    return path


@pytest.fixture
def trt10(monkeypatch):
    return FakeGPU("10.3.0").install(monkeypatch)


def test_text_encoder_loras_and_embeddings_together(trt10, tmp_path, monkeypatch):
    """A text encoder LoRA on TensorRT 10 needs the parser refitter (q_w is fused with an
    unmapped weight): it reads the grown graph kept beside the rows plan, never the
    bundle's smaller one, and the embeddings' rows and the LoRA's weights are written back
    over what it read, in either order; a LoRA refit TensorRT gives up on leaves the plan
    reloaded with the embeddings refitted again."""
    bundle = te_bundle(tmp_path / "bundle")
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    assert build([str(bundle), "--backend", "tensorrt"]) == 0
    assert build([str(bundle), "--backend", "tensorrt", "--refit"]) == 0
    one = embedding(tmp_path, "<thing>", 1, 1)
    a, b = te_lora(tmp_path / "a.safetensors", 3), te_lora(tmp_path / "b.safetensors", 4)
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        enc = pipe.engines["text_encoder"]
        pipe.set_loras([(a, 1.0)])  # plain plan -> the refittable one (which keeps rows)
        reads = [c[1] for c in trt10.calls("refit_from_file")]
        assert reads and all(r == str(enc.path.parent / "text_encoder.onnx") for r in reads)
        q_a = enc.engine.weights["q_w"][1]
        assert q_a != enc.engine.built["q_w"][1]
        pipe.set_embeddings([one])  # the LoRA stays
        assert enc.engine.weights["q_w"][1] == q_a
        with_emb = enc.engine.weights["emb"][1]
        assert with_emb != enc.engine.built["emb"][1]
        pipe.set_loras([(b, 1.0)])  # the parser reads the graph again: the rows stay
        assert enc.engine.weights["emb"][1] == with_emb
        q_b = enc.engine.weights["q_w"][1]
        pipe.set_loras([(a, 1.0)])
        assert enc.engine.weights["q_w"][1] == q_a and enc.engine.weights["emb"][1] == with_emb

        real, failed = trt10.tensorrt.Refitter, []

        def failing(engine, logger):  # the LoRA's refit fails, the table's again works
            r = real(engine, logger)
            if not failed:
                failed.append(r)
                r.refit_cuda_engine = lambda: False
            return r

        monkeypatch.setattr(trt10.tensorrt, "Refitter", failing)
        with pytest.raises(EngineError, match="refit failed"):
            pipe.set_loras([(b, 1.0)])
        monkeypatch.setattr(trt10.tensorrt, "Refitter", real)
        assert pipe.loras == [] and [e.token for e in pipe.embeddings] == ["<thing>"]
        assert enc.engine.weights["q_w"][1] == enc.engine.built["q_w"][1]
        assert enc.engine.weights["emb"][1] == with_emb
        assert q_b != q_a


def test_refused_embeddings_keep_the_text_encoder(trt10, tmp_path, monkeypatch):
    """Plain plans only: set_embeddings is refused in one line and nothing is reloaded,
    even with a text encoder LoRA recorded (a refittable plan built before plans kept
    rows), and set_embeddings([]) changes nothing either."""
    bundle = te_bundle(tmp_path / "bundle")
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    assert build([str(bundle), "--backend", "tensorrt"]) == 0
    logs = []
    with Pipeline(bundle, "tensorrt", safety=False, log=logs.append) as pipe:
        enc = pipe.engines["text_encoder"]
        pipe._lora_touched = {"text_encoder": {TE_Q}}
        with pytest.raises(EngineError, match="keeps no token-table rows"):
            pipe.set_embeddings([embedding(tmp_path, "<thing>", 1, 1)])
        pipe.set_embeddings([])
        assert pipe.engines["text_encoder"] is enc and enc.engine is not None
        assert not any("dropped" in m for m in logs), logs


def test_loras_forget_plans_found_before_them(trt10, tmp_path, monkeypatch):
    """Plans found per shape before LoRAs (a plain static plan) are looked up again under
    the new requirement: the static shape then runs on the refittable dynamic plan, with
    the LoRA's weights."""
    bundle = mapped_bundle(tmp_path / "bundle")
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    assert build([str(bundle), "--backend", "tensorrt", "--static", "--opt", "1x64x64"]) == 0
    assert build([str(bundle), "--backend", "tensorrt", "--refit"]) == 0
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        unet = pipe.engines["unet"]
        latents(pipe, 64, guidance=7.5)  # UNet batch 2 at 64x64: the plain static plan
        assert not unet.engine.refittable
        latents(pipe, 128)  # the refittable dynamic plan
        pipe.set_loras([(lora(tmp_path / "a.safetensors", 1), 1.0)])
        shift = unet.engine.shift()
        latents(pipe, 64, guidance=7.5)
        assert unet.engine.refittable and unet.engine.shift() == shift != 0.0

"""Textual inversion (Pipeline.set_embeddings, --embedding) on ort-cpu, against diffusers'
load_textual_inversion on the same demo weights: within 2/255 for both file formats and a
multi-vector embedding; a prompt without the words is untouched, [] gives the bundle's
own engine back, LoRAs and embeddings stack in either order."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.numpy import save_file  # noqa: E402

from runtime.bundle import demo_bundle, read_manifest  # noqa: E402
from runtime.embeddings import read_embedding  # noqa: E402
from runtime.pipeline import Pipeline, UsageError  # noqa: E402
from tests.test_lora import adapters, files  # noqa: E402, F401  (fixtures)
from tests.test_pipeline_parity import compare  # noqa: E402

PROMPT = "a photo of <red-thing> riding a horse, <big-style> style, demo-emb"
PLAIN = "a photo of an astronaut riding a horse on mars"


def run(pipe, prompt=PROMPT, negative="blurry demo-emb"):
    return pipe(prompt, negative, steps=5, scheduler="euler", seed=4).images


@pytest.fixture(scope="module")
def width():
    return read_manifest(demo_bundle()).hidden


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, width):
    """diffusers' format with one vector and with three; A1111's (emb_params) with two."""
    folder, rng = tmp_path_factory.mktemp("embeddings"), np.random.default_rng(7)
    made = {"one": ({"<red-thing>": rng.standard_normal(width, np.float32)}, "one.safetensors"),
            "three": ({"<big-style>": rng.standard_normal((3, width), np.float32)},
                      "three.safetensors"),
            "a1111": ({"emb_params": rng.standard_normal((2, width), np.float32)},
                      "demo-emb.safetensors")}
    out = {}
    for key, (tensors, name) in made.items():
        save_file(tensors, str(folder / name))
        out[key] = folder / name
    return out


def diffusers_images(paths, loras=()):
    from export.components import build_components
    from tests.test_lora_export import _bundle_for_tokenizer, reference

    pipe = reference(build_components("demo", seed=0), _bundle_for_tokenizer(), "euler", safety=False)
    for path, scale in loras:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=path.stem)
        pipe.fuse_lora(lora_scale=scale, adapter_names=[path.stem])
        pipe.unload_lora_weights()
    for path in paths:  # A1111's file has no token inside: diffusers is given its name
        pipe.load_textual_inversion(str(path), token=path.stem if path.stem == "demo-emb" else None)
    out = pipe(PROMPT, negative_prompt="blurry demo-emb", num_inference_steps=5,
               guidance_scale=7.5, output_type="np", generator=torch.Generator("cpu").manual_seed(4))
    return (out.images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pipe():
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as p:
        yield p


def test_embeddings_match_diffusers_and_go_away(pipe, embeddings):
    base, plain = run(pipe), run(pipe, PLAIN, "blurry")
    text_encoder = pipe.engines["text_encoder"]
    paths = [embeddings["one"], embeddings["three"], embeddings["a1111"]]
    pipe.set_embeddings(paths)
    got = run(pipe)
    diff = compare(got, diffusers_images(paths))
    print(f"embeddings vs diffusers: max {diff.max()}, mean {diff.mean():.3f} (of 255)")
    assert np.abs(got.astype(int) - base).max() > 10  # the words do something
    # prompts without them: as before (the LoRA-ready text encoder that holds the grown
    # table may round otherwise than the bundle's CPU-fused one)
    assert np.abs(run(pipe, PLAIN, "blurry").astype(int) - plain).max() <= 1
    assert [e.token for e in pipe.embeddings] == ["<red-thing>", "<big-style>", "demo-emb"]
    # the word as the tokenizer matches it, in any case: every vector of it
    assert np.array_equal(run(pipe, PROMPT.upper(), "BLURRY DEMO-EMB"),
                          run(pipe, PROMPT.upper().replace("<BIG-STYLE>", "<big-style>"),
                              "BLURRY DEMO-EMB"))
    engine = pipe.engines["text_encoder"]
    dims = {name: i.shape[0] for i in engine.session.get_inputs() for name in engine.tables
            if i.name == name}
    assert len(set(dims.values())) == len(dims) >= 1  # a symbolic row count per table
    pipe.set_embeddings([embeddings["one"]])  # a new set replaces the last, in place
    assert pipe.engines["text_encoder"] is engine
    compare(run(pipe), diffusers_images([embeddings["one"]]))
    pipe.set_embeddings([])
    assert pipe.engines["text_encoder"] is not text_encoder  # a fresh bundle engine
    assert getattr(pipe.engines["text_encoder"], "weights", None) is None
    assert np.array_equal(run(pipe), base) and pipe.embeddings == []


def test_loras_and_embeddings_stack_in_either_order(pipe, embeddings, files):  # noqa: F811
    lora, emb = [(files["kohya"], 0.8)], [embeddings["three"], embeddings["a1111"]]
    pipe.set_loras(lora)
    lora_only = run(pipe)
    pipe.set_embeddings(emb)
    both = run(pipe)
    compare(both, diffusers_images(emb, lora))
    pipe.set_loras([])  # the embeddings stay
    emb_only = run(pipe)
    pipe.set_loras(lora)
    assert np.array_equal(run(pipe), both)
    pipe.set_embeddings([])  # the LoRA stays
    assert np.array_equal(run(pipe), lora_only)
    pipe.set_loras([])
    pipe.set_embeddings(emb)
    assert np.array_equal(run(pipe), emb_only)
    pipe.set_embeddings([])


def test_a_failure_midway_leaves_a_working_pipeline(pipe, embeddings, files, monkeypatch):  # noqa: F811
    """A LoRA-ready text encoder that cannot load: set_embeddings raises, and the Pipeline
    runs on without embeddings. A LoRA that fails midway keeps the embeddings."""
    base = run(pipe)
    real = pipe.engine_set.replace_weights

    def fails(name, manifest, bundle, weights, *a, **k):
        if weights is not None and not k.get("in_place"):
            raise RuntimeError("no memory for it")
        return real(name, manifest, bundle, weights, *a, **k)

    monkeypatch.setattr(pipe.engine_set, "replace_weights", fails)
    with pytest.raises(RuntimeError, match="no memory"):
        pipe.set_embeddings([embeddings["three"]])
    monkeypatch.setattr(pipe.engine_set, "replace_weights", real)
    assert pipe.embeddings == [] and "text_encoder" in pipe.engines
    assert np.array_equal(run(pipe), base)

    pipe.set_embeddings([embeddings["three"]])
    emb_only = run(pipe)
    import runtime.lora_apply

    lora_weights = runtime.lora_apply.lora_weights

    def unet_fails(bundle, manifest, loras, also=None, into=None):
        if also and "unet" in also:
            raise RuntimeError("the UNet's weights failed")
        return lora_weights(bundle, manifest, loras, also, into)

    monkeypatch.setattr(runtime.lora_apply, "lora_weights", unet_fails)
    with pytest.raises(RuntimeError, match="UNet"):
        pipe.set_loras([(files["kohya"], 1.0)])
    monkeypatch.setattr(runtime.lora_apply, "lora_weights", lora_weights)
    assert pipe.loras == [] and [e.token for e in pipe.embeddings] == ["<big-style>"]
    assert np.array_equal(run(pipe), emb_only)
    req = pipe.request(PROMPT, steps=2, seed=1)
    pipe.set_embeddings([])
    with pytest.raises(UsageError, match="make the request again"):  # its ids are stale
        pipe.run(req)


def test_bad_embeddings_are_one_line(pipe, embeddings, tmp_path, width):
    def refused(path, match):
        with pytest.raises(UsageError, match=match) as e:
            pipe.set_embeddings([path])
        assert "\n" not in str(e.value)

    save_file({"<wide>": np.zeros((2, width + 1), np.float32)}, str(tmp_path / "wide.safetensors"))
    refused(tmp_path / "wide.safetensors", "another model")
    save_file({"clip_l": np.zeros((1, width), np.float32), "clip_g": np.zeros((1, 1280), np.float32)},
              str(tmp_path / "sdxl.safetensors"))
    refused(tmp_path / "sdxl.safetensors", "not a textual-inversion embedding")
    save_file({"<|endoftext|>": np.zeros(width, np.float32)}, str(tmp_path / "eos.safetensors"))
    refused(tmp_path / "eos.safetensors", "vocabulary already")
    (tmp_path / "x.pt").write_bytes(b"\x80\x04not opened")
    refused(tmp_path / "x.pt", "pickles")
    save_file({"<nan>": np.full(width, np.nan, np.float32)}, str(tmp_path / "nan.safetensors"))
    refused(tmp_path / "nan.safetensors", "NaN")
    with pytest.raises(UsageError, match="also"):
        pipe.set_embeddings([embeddings["one"], embeddings["one"]])
    refused(tmp_path / "missing.safetensors", "no such file")
    assert pipe.embeddings == [] and run(pipe).shape == (1, 64, 64, 3)
    with Pipeline(demo_bundle(), "ort-cpu", safety=False, use_cache=False) as plain, \
            pytest.raises(UsageError, match="need the engine cache"):
        plain.set_embeddings([embeddings["one"]])


def test_read_embedding_formats(embeddings, width):
    assert read_embedding(embeddings["one"], width).vectors.shape == (1, width)
    three = read_embedding(embeddings["three"], width)
    assert three.tokens == ["<big-style>", "<big-style>_1", "<big-style>_2"]
    assert read_embedding(embeddings["a1111"], width).token == "demo-emb"


def test_cli_embedding(embeddings, tmp_path, width):
    from runtime.generate import main

    out = tmp_path / "out"
    assert main(["a photo of <red-thing>", "--model", "demo", "--steps", "2", "--seed", "1",
                 "--embedding", str(embeddings["one"]), "--output-dir", str(out), "--no-safety"]) == 0
    assert len(list(out.glob("*.png"))) == 1
    save_file({"<wide>": np.zeros(width + 1, np.float32)}, str(tmp_path / "wide.safetensors"))
    assert main(["x", "--model", "demo", "--embedding", str(tmp_path / "wide.safetensors"),
                 "--output-dir", str(tmp_path / "o2")]) == 2
    assert main(["x", "--model", "demo", "--backend", "openvino", "--embedding",
                 str(tmp_path / "wide.safetensors"), "--output-dir", str(tmp_path / "o3")]) == 2
    save_file({"Photo": np.zeros(width, np.float32)}, str(tmp_path / "word.safetensors"))
    for bad in ([str(embeddings["one"]), str(embeddings["one"])],  # one word twice
                [str(tmp_path / "word.safetensors")]):  # "photo" is a word already
        argv = ["x", "--model", "demo", "--output-dir", str(tmp_path / "o4")]
        assert main(argv + [a for b in bad for a in ("--embedding", b)]) == 2
    assert not any((tmp_path / d).exists() for d in ("o2", "o3", "o4"))


def test_openvino_embeddings_recompile_and_stack(pipe, embeddings, files):  # noqa: F811
    """OpenVINO: the text encoder's token-table constant replaced by the grown table and
    compiled again; fp32 within 2/255 of ort-cpu with the same embeddings (and LoRA),
    LoRAs and embeddings stack in either order, [] gives the graph's own picture back
    bit for bit, and a compile that fails leaves the Pipeline without embeddings."""
    pytest.importorskip("openvino")
    from runtime.engine import EngineError

    emb, lora = [embeddings["three"], embeddings["a1111"]], [(files["kohya"], 0.8)]
    pipe.set_embeddings(emb)
    want = run(pipe)
    pipe.set_loras(lora)
    want_both = run(pipe)
    pipe.set_loras([])
    pipe.set_embeddings([])
    with Pipeline(demo_bundle(), "openvino", safety=False, precision="fp32") as ov:
        base = run(ov)
        ov.set_embeddings([embeddings["one"]])
        assert not np.array_equal(run(ov), base)
        ov.set_embeddings(emb)  # another set: the bundle's table grown again
        got = run(ov)
        compare(got, want)
        ov.set_loras(lora)  # the text encoder recompiled with the LoRA and the table
        both = run(ov)
        compare(both, want_both)
        ov.set_embeddings([])  # the LoRA stays
        lora_only = run(ov)
        ov.set_embeddings(emb)
        assert np.array_equal(run(ov), both)
        ov.set_loras([])  # the embeddings stay
        assert np.array_equal(run(ov), got)
        ov.set_embeddings([])
        assert np.array_equal(run(ov), base)
        ov.set_loras(lora)
        assert np.array_equal(run(ov), lora_only)
        ov.set_loras([])
        enc = ov.engines["text_encoder"]
        real = enc.core

        class OutOfMemory:
            def compile_model(self, *args, **kwargs):
                raise RuntimeError("out of memory compiling")

        enc.core = OutOfMemory()
        with pytest.raises(EngineError, match="out of memory compiling"):
            ov.set_embeddings(emb)
        enc.core = real
        assert ov.embeddings == [] and np.array_equal(run(ov), base)


def test_a_text_encoder_that_cannot_be_put_back_drops_every_lora(embeddings, files):  # noqa: F811
    """Last resort: a failed set whose text encoder cannot get the old table back either
    reloads every LoRA graph from the bundle and drops every LoRA (the UNet's too, so
    `loras` never lists weights that are not there)."""
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as p:
        base = run(p)
        p.set_loras([(files["kohya"], 0.8)])  # the UNet and the text encoder
        assert {"unet", "text_encoder"} <= set(p._lora_touched)
        p.set_embeddings([embeddings["one"]])

        def fails(*args, **kwargs):
            raise RuntimeError("no memory for it")

        real, p.engine_set.replace_weights = p.engine_set.replace_weights, fails
        with pytest.raises(RuntimeError, match="no memory"):
            p.set_embeddings([embeddings["one"], embeddings["three"]])
        p.engine_set.replace_weights = real
        assert p.loras == [] and p.embeddings == [] and p._lora_touched == {}
        assert np.array_equal(run(p), base)


def test_cli_refuses_more_vectors_than_tensorrt_keeps_before_loading(tmp_path, width, capsys):
    """More than TABLE_ROWS (256) vectors on tensorrt: one line, exit 2, before any
    engine loads (so also where TensorRT is not installed, as here)."""
    from runtime.generate import main

    args = ["x", "--model", "demo", "--backend", "tensorrt", "--output-dir", str(tmp_path / "o")]
    for i in range(4):  # 4 x 75 = 300 vectors
        save_file({f"<w{i}>": np.zeros((75, width), np.float32)}, str(tmp_path / f"w{i}.safetensors"))
        args += ["--embedding", str(tmp_path / f"w{i}.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("a TensorRT text encoder plan keeps 256 rows for them"), err
    assert not (tmp_path / "o").exists()

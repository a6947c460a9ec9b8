"""The export stage on the tiny demo components: each ONNX graph against torch at the
export shape and at other batch sizes / sizes, the external-data path, the manifest.

Tolerances (ONNX Runtime CPU fp32 vs torch CPU fp32; measured errors are 1e-7 .. 6e-6):
text encoder 1e-5, UNet 1e-4, VAE decoder 1e-4 (outputs reach ~10), safety checker
scores 1e-5 and flags exactly equal.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from export.bundle_writer import _replace, export_bundle  # noqa: E402
from export.clip_vocab import write_tokenizer_files  # noqa: E402
from export.components import weights_sha256  # noqa: E402
from export.configs import DEMO  # noqa: E402
from export.errors import ExportError  # noqa: E402
from export.graphs import GraphJob, SafetyChecker, export_onnx, ort_session, sample_inputs  # noqa: E402
from runtime.bundle import GRAPH_ORDER, graph_spec, read_manifest, sha256_file, verify_hashes  # noqa: E402

THRESHOLD = 1_000_000  # bytes: text_encoder (6.4 MB) and unet (2.2 MB) go external, the rest inline
TOL = {"text_encoder": 1e-5, "unet": 1e-4, "vae_decoder": 1e-4, "vae_encoder": 1e-4,
       "safety_checker": 1e-5}


@pytest.fixture(scope="module")
def bundle(demo_components, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    lines = []
    export_bundle(demo_components, out, external_data_threshold=THRESHOLD, log=lines.append)
    assert [ln.split(":")[0] for ln in lines] == list(GRAPH_ORDER)  # one progress line per graph
    assert all(" s, max abs error vs torch " in ln for ln in lines)
    return out


def reference(name, c, inputs):
    """The diffusers/transformers module itself, not export's wrapper."""
    with torch.no_grad():
        if name == "text_encoder":
            return [c.text_encoder(input_ids=inputs[0].long()).last_hidden_state]
        if name == "unet":
            return [c.unet(*inputs).sample]
        if name == "vae_decoder":
            return [c.vae.decode(inputs[0]).sample]
        if name == "vae_encoder":
            return [c.vae.encode(inputs[0]).latent_dist.parameters]
        images = torch.zeros(inputs[0].shape[0], 3, 8, 8)
        _, flags = c.safety_checker.forward_onnx(inputs[0], images)
        return [flags]


CASES = [  # (graph, batch B, latent (h, w) or None for the export shape)
    ("text_encoder", 1, None), ("text_encoder", 3, None),
    ("unet", 1, None), ("unet", 1, (8, 8)), ("unet", 2, (6, 10)), ("unet", 3, (8, 8)),
    ("unet", 1, (7, 9)),  # odd sizes too: upsample sizes come from the input shape
    ("vae_decoder", 1, None), ("vae_decoder", 2, (8, 8)), ("vae_decoder", 1, (6, 10)),
    ("vae_encoder", 1, None), ("vae_encoder", 2, (8, 8)), ("vae_encoder", 1, (6, 10)),
    ("safety_checker", 1, None), ("safety_checker", 3, None),
]


@pytest.mark.parametrize(("name", "batch", "latent"), CASES)
def test_graph_matches_torch(bundle, demo_components, name, batch, latent):
    c = demo_components
    inputs = sample_inputs(name, c, batch, latent, seed=11)
    spec = graph_spec(name, c.hidden)
    sess = ort_session(bundle / spec.file)
    got = sess.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)})
    want = [t.numpy() for t in reference(name, c, inputs)]
    for t, g in zip(spec.outputs, got, strict=True):
        assert str(g.dtype) == t.dtype
    assert got[0].shape == want[0].shape
    if name == "safety_checker":
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1].shape == (batch, 17)
    else:
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=TOL[name])


@pytest.mark.parametrize("tokens", [77, 231, 385])
def test_unet_takes_any_text_length(bundle, demo_components, tokens):
    """The text axis T is dynamic: one to five prompt chunks, as torch computes them."""
    c = demo_components
    sample, timestep, _ = sample_inputs("unet", c, 1, (8, 8), seed=5)
    text = torch.randn(2, tokens, c.hidden, generator=torch.Generator().manual_seed(tokens))
    got = ort_session(bundle / "unet.onnx").run(None, {
        "sample": sample.numpy(), "timestep": timestep.numpy(),
        "encoder_hidden_states": text.numpy()})[0]
    np.testing.assert_allclose(got, reference("unet", c, (sample, timestep, text))[0].numpy(),
                               rtol=0, atol=TOL["unet"])


def test_safety_checker_flags_and_scores_like_forward_onnx(demo_components, tmp_path):
    """Thresholds set between two images' cosines: one flagged, one not, as diffusers says."""
    import copy

    checker = copy.deepcopy(demo_components.safety_checker)
    (clip_input,) = sample_inputs("safety_checker", demo_components, 2, seed=3)
    with torch.no_grad():
        emb = checker.visual_projection(checker.vision_model(clip_input)[1])
        cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(checker.concept_embeds).T
        checker.concept_embeds_weights[0] = cos[:, 0].mean()  # between image 0's and image 1's
        images = torch.ones(2, 3, 8, 8)
        black, flags = checker.forward_onnx(clip_input, images.clone())
    assert flags.tolist() in ([True, False], [False, True])
    job = GraphJob(graph_spec("safety_checker", demo_components.hidden), SafetyChecker(checker).eval(),
                   (clip_input,))
    export_onnx(job, tmp_path / "s.onnx", 17)
    has_nsfw, scores, special = ort_session(tmp_path / "s.onnx").run(
        None, {"clip_input": clip_input.numpy()})
    np.testing.assert_array_equal(has_nsfw, flags.numpy())
    np.testing.assert_allclose(scores, (cos - checker.concept_embeds_weights).numpy(), atol=1e-5)
    assert special.shape == (2, 3)
    assert bool((black[flags] == 0).all()) and bool((black[~flags] == 1).all())  # host's job


def test_external_data(bundle):
    m = read_manifest(bundle)
    for name in ("text_encoder", "unet"):
        e = m.graphs[name]
        assert e.external_data == f"{name}.onnx.data"
        graph, data = os.path.getsize(bundle / e.file), os.path.getsize(bundle / e.external_data)
        assert data > 3 * graph  # most weight bytes moved out of the graph
        assert e.external_sha256 == sha256_file(bundle / e.external_data)
    for name in ("vae_decoder", "vae_encoder", "safety_checker"):
        assert m.graphs[name].external_data is None and m.graphs[name].external_sha256 is None
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")}
    assert files == {"manifest.json", "scheduler_config.json", "tokenizer", "tokenizer/vocab.json",
                     "tokenizer/merges.txt", "text_encoder.onnx", "text_encoder.onnx.data",
                     "unet.onnx", "unet.onnx.data", "vae_decoder.onnx", "vae_encoder.onnx",
                     "safety_checker.onnx"}
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]  # no temp folders left


def test_manifest(bundle, demo_components, tmp_path):
    c = demo_components
    m = read_manifest(bundle)
    verify_hashes(bundle, m)
    assert m.source == {"model": "demo", "hash": weights_sha256(c)}
    assert m.opset == 17 and m.hidden == DEMO.text_encoder["hidden_size"] and m.profile == DEMO.profile
    assert (m.default_height, m.default_width) == (64, 64)  # unet sample_size 8 * 8
    assert m.vae_scaling == "host" and m.vae_scaling_factor == 0.18215
    for p in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "numpy", "python"):
        assert m.packages[p]
    assert list(m.graphs) == list(GRAPH_ORDER)
    for name, e in m.graphs.items():
        assert e.spec == graph_spec(name, m.hidden, 17)
        assert e.sha256 == sha256_file(bundle / e.file)
        assert 0 <= e.max_abs_error < TOL[name]
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["graphs"]["unet"]["shapes"]["sample"] == {
        "min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [8, 4, 64, 64]}
    # the text axis: one prompt chunk (77 tokens) at min and opt, three at max (long prompts)
    assert raw["graphs"]["unet"]["shapes"]["encoder_hidden_states"] == {
        "min": [1, 77, m.hidden], "opt": [2, 77, m.hidden], "max": [8, 231, m.hidden]}
    assert raw["format_minor"] == 1 and m.max_text_tokens is None
    sched = json.loads((bundle / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler"
    assert {k: sched[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                  "skip_prk_steps", "steps_offset", "set_alpha_to_one", "clip_sample",
                                  "prediction_type")} == {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1,
        "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon"}
    # v1-4's own file has no timestep_spacing: other schedulers built from it use their defaults
    assert "timestep_spacing" not in sched
    write_tokenizer_files(tmp_path)
    for f in ("vocab.json", "merges.txt"):
        assert (bundle / "tokenizer" / f).read_bytes() == (tmp_path / f).read_bytes()


def test_existing_output_needs_force(bundle, demo_components):
    with pytest.raises(ExportError, match="--force"):
        export_bundle(demo_components, bundle)


def test_replace_swaps_in_the_new_bundle(tmp_path):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    new.mkdir()
    (new / "manifest.json").write_text("new")
    _replace(new, out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_no_safety_checker_leaves_the_graph_out(demo_components):
    from export.graphs import graph_jobs

    assert [j.spec.name for j in graph_jobs(demo_components, safety=False)] == list(GRAPH_ORDER[:4])

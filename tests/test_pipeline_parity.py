"""Our torch-free pipeline vs diffusers' StableDiffusionPipeline on the same weights.

The shipped demo bundle is exported from export.components.build_components("demo"),
so diffusers runs those very modules and we run the bundle. Same prompt, seed, steps,
scheduler and guidance; the final uint8 images must agree within 2/255 (the issue's
bound). Measured on this machine with the trained demo (2-core AMD EPYC): max 1/255 for
every scheduler at 10 steps and guidance 7.5, mean 8e-5 to 6e-4 with this prompt (words
the demo never saw), 0 to 7e-4 with one it knows.

Stability of the reference was checked before picking these settings (DESIGN.md), and
again on the trained demo: nudging diffusers' own initial latents by 1e-5 moves its
output by at most 1/255, for every scheduler at 10 steps and guidance 7.5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from runtime.bundle import SCHEDULER_CONFIG, TOKENIZER_DIR, demo_bundle  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.schedulers import CONFIG_OVERRIDES, DIFFUSERS_CLASS, SCHEDULERS  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"
TOLERANCE = 2  # /255
KNOWN = "a red star on a blue background"  # a caption of the kind the demo was trained on


def feature_extractor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(  # v1-4's feature_extractor/preprocessor_config.json
        crop_size=224, do_center_crop=True, do_convert_rgb=True, do_normalize=True,
        do_resize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size=224)


def reference(components, bundle, scheduler: str, safety: bool):
    from transformers import CLIPTokenizer

    tok_dir = bundle / TOKENIZER_DIR
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                              model_max_length=77)
    # The bundle's scheduler_config.json, as a diffusers user loading that file gets it.
    config = json.loads((bundle / SCHEDULER_CONFIG).read_text())
    cls = getattr(diffusers, DIFFUSERS_CLASS[scheduler])
    sched = cls.from_config({**config, **CONFIG_OVERRIDES.get(scheduler, {})})
    pipe = diffusers.StableDiffusionPipeline(
        components.vae, components.text_encoder, tokenizer, components.unet, sched,
        components.safety_checker if safety else None, feature_extractor() if safety else None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_REFERENCE_IMAGES: dict = {}  # (scheduler, safety, args) -> images, nsfw: once for all backends


def cached_reference(components, bundle, scheduler, safety, *args):
    key = (scheduler, safety, args)
    if key not in _REFERENCE_IMAGES:
        _REFERENCE_IMAGES[key] = run_reference(reference(components, bundle, scheduler, safety),
                                               *args)
    return _REFERENCE_IMAGES[key]


def run_reference(pipe, prompt, negative, steps, guidance, seed, batch=1, height=None, width=None):
    out = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps,
               guidance_scale=guidance, num_images_per_prompt=batch, height=height, width=width,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    images = (out.images * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
    return images, out.nsfw_content_detected


@pytest.fixture(scope="module", params=["ort-cpu", "openvino"])
def ours(request):
    """Every CPU backend in fp32 (the bf16 rule is tested below)."""
    if request.param == "openvino":
        pytest.importorskip("openvino")
    with Pipeline(demo_bundle(), request.param, precision="fp32") as pipe:
        yield pipe


def compare(ours_images, ref_images):
    assert ours_images.shape == ref_images.shape
    diff = np.abs(ours_images.astype(int) - ref_images.astype(int))
    assert diff.max() <= TOLERANCE, f"max {diff.max()}/255, mean {diff.mean():.2e}"
    return diff


@pytest.mark.parametrize("prompt", [PROMPT, KNOWN])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_each_scheduler_matches_diffusers(demo_components, ours, scheduler, prompt):
    """Words the demo never saw (their token rows are zero: conditioning close to the
    empty prompt's) and a caption it was trained on (guidance pulls hard)."""
    ref_images, ref_nsfw = cached_reference(demo_components, ours.bundle, scheduler, True,
                                            prompt, "", 10, 7.5, 3)
    result = ours(prompt, steps=10, scheduler=scheduler, guidance_scale=7.5, seed=3)
    compare(result.images, ref_images)
    assert result.safety_checked and result.nsfw == list(ref_nsfw)


@pytest.mark.parametrize(
    "case",
    [
        dict(guidance=1.0, steps=12, scheduler="pndm"),  # no CFG: the UNet runs on one half
        dict(guidance=5.0, steps=8, scheduler="euler", batch=2, negative="blurry, low quality"),
        dict(guidance=7.5, steps=6, scheduler="dpmpp_2m", height=64, width=80),
        dict(guidance=7.5, steps=50, scheduler="pndm"),  # v1-4's default: 51 UNet calls
    ],
    ids=["no-cfg", "batch2-negative", "64x80", "pndm50"],
)
def test_settings_match_diffusers(demo_components, ours, case):
    ref_images, _ = cached_reference(demo_components, ours.bundle, case["scheduler"], False,
                                     PROMPT, case.get("negative", ""), case["steps"],
                                     case["guidance"], 11, case.get("batch", 1),
                                     case.get("height"), case.get("width"))
    result = ours(PROMPT, case.get("negative", ""), steps=case["steps"],
                  scheduler=case["scheduler"], guidance_scale=case["guidance"], seed=11,
                  batch_size=case.get("batch", 1), height=case.get("height"),
                  width=case.get("width"), safety=False)
    compare(result.images, ref_images)
    assert not result.safety_checked


def test_flagged_images_are_black_like_diffusers(tmp_path):
    """A checker whose thresholds flag everything: both pipelines return black images."""
    from export.bundle_writer import export_bundle
    from export.components import build_components

    components = build_components("demo", seed=0)
    with torch.no_grad():  # score = cosine - weight > 0 for every concept
        components.safety_checker.concept_embeds_weights.fill_(-1.0)
    bundle = export_bundle(components, tmp_path / "flagging", log=lambda msg: None)
    ref = reference(components, bundle, "euler", safety=True)
    ref_images, ref_nsfw = run_reference(ref, PROMPT, "", 4, 7.5, seed=5, batch=2)
    with Pipeline(bundle, "ort-cpu") as pipe:
        result = pipe(PROMPT, steps=4, scheduler="euler", seed=5, batch_size=2)
    assert result.nsfw == list(ref_nsfw) == [True, True]
    assert not result.images.any() and not ref_images.any()


def test_bf16_is_as_close_to_fp32_as_diffusers_own_bf16():
    """Reduced precision is judged against the reference's own (DESIGN.md): our bf16
    picture (OpenVINO: UNet and VAE in bf16, text encoder and safety checker fp32) must
    be no further from diffusers' fp32 picture than diffusers' bf16 picture is (its
    whole pipeline cast with .to(torch.bfloat16), as a diffusers user gets it)."""
    pytest.importorskip("openvino")
    from runtime import cpu

    if not cpu.has_bf16():
        pytest.skip("this CPU has no bf16 units: OpenVINO would not run bf16")
    from export.components import build_components

    bundle = demo_bundle()
    # its own components: .to(bfloat16) and back rounds every weight to bf16, which
    # would change the shared fixture's references for every later test
    ref = reference(build_components("demo", seed=0), bundle, "pndm", safety=False)
    # a prompt the trained demo knows, at its default 50 steps: with 10 PNDM steps at
    # guidance 7.5 (or words it never saw) its multistep updates overshoot (README, "The
    # demo model"), and any rounding, diffusers' own bf16 included, grows into another
    # picture. Measured here: 1.20 ours, 1.38 diffusers' bf16 (/255, mean)
    prompt, kw = KNOWN, dict(steps=50, guidance=7.5, seed=3)
    fp32, _ = run_reference(ref, prompt, "", kw["steps"], kw["guidance"], kw["seed"])
    ref.to(torch.bfloat16)
    bf16, _ = run_reference(ref, prompt, "", kw["steps"], kw["guidance"], kw["seed"])
    with Pipeline(bundle, "openvino", precision="bf16") as pipe:
        assert pipe.precision == "bf16"
        # the UNet and VAE from the fp16-weight IR, as every bf16 run (not a silent fallback)
        assert {pipe.load_report.graphs[g].cache for g in ("unet", "vae_decoder")} <= {
            "built", "hit"}
        got = pipe(prompt, steps=kw["steps"], scheduler="pndm", guidance_scale=kw["guidance"],
                   seed=kw["seed"], safety=False).images
    theirs = np.abs(bf16.astype(int) - fp32.astype(int)).mean()
    ours_ = np.abs(got.astype(int) - fp32.astype(int)).mean()
    print(f"mean distance to diffusers fp32: diffusers bf16 {theirs:.3f}, ours bf16 {ours_:.3f} /255")
    assert ours_ <= theirs


def test_the_models_own_vae_scaling_factor_is_used(tmp_path):
    """The manifest records the VAE's `scaling_factor` (not always v1's 0.18215) and the
    host divides by it, as diffusers does (`latents / vae.config.scaling_factor`)."""
    from export.bundle_writer import export_bundle
    from export.components import build_components
    from runtime.bundle import read_manifest

    c = build_components("demo", seed=0)
    c.vae.register_to_config(scaling_factor=0.13025)
    bundle = export_bundle(c, tmp_path / "bundle", safety=False)
    assert read_manifest(bundle).vae_scaling_factor == pytest.approx(0.13025)
    ref, _ = run_reference(reference(c, bundle, "euler", False), PROMPT, "", 3, 7.5, 4)
    with Pipeline(bundle, "ort-cpu") as pipe:
        compare(pipe(PROMPT, steps=3, scheduler="euler", seed=4).images, ref)


def test_a_size_outside_the_profile_matches_diffusers(demo_components):
    """The demo's profile starts at 64 px; ort-cpu has no profile and runs 40x56."""
    ref, _ = cached_reference(demo_components, demo_bundle(), "pndm", False, PROMPT, "", 3, 7.5,
                              6, 1, 40, 56)
    with Pipeline(demo_bundle(), "ort-cpu", safety=False) as pipe:
        assert pipe.manifest.profile.height[0] > 40
        compare(pipe(PROMPT, steps=3, seed=6, height=40, width=56).images, ref)


def test_ort_cpu_with_the_cpu_fused_graphs_matches_diffusers(demo_components, tmp_path,
                                                              monkeypatch):
    """engines.build --backend ort-cpu: onnxruntime's CPU fusions (attention as
    Attention/MultiHeadAttention, LayerNorm, no CUDA-only ops), picked up by the ort-cpu
    backend, within 2/255 of diffusers like the unfused graphs."""
    import onnx

    from engines.build import main

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path))
    assert main(["demo", "--backend", "ort-cpu"]) == 0
    [fused] = (tmp_path / "ort-cpu").glob("unet-*/unet.onnx")
    ops = {n.op_type for n in onnx.load(str(fused), load_external_data=False).graph.node}
    assert {"Attention", "MultiHeadAttention"} <= ops  # self- and cross-attention fused
    assert not ops & {"GroupNorm", "BiasSplitGelu", "NhwcConv", "BiasAdd"}  # CUDA-only
    ref, _ = cached_reference(demo_components, demo_bundle(), "pndm", True, PROMPT, "", 10,
                              7.5, 3)
    with Pipeline(demo_bundle(), "ort-cpu") as pipe:
        assert all(g.cache == "built from the CPU-fused graph"
                   for g in pipe.load_report.graphs.values())
        compare(pipe(PROMPT, steps=10, guidance_scale=7.5, seed=3).images, ref)

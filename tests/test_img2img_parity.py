"""img2img and inpainting vs diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on the same weights, seed and images.

The shipped demo bundle (format 1.1: it has the VAE encoder) runs img2img for every
scheduler at strengths 0.3, 0.75 and 1.0, and inpainting with its 4-channel UNet
(diffusers' mask blend after every step); a tiny random 9-channel inpainting UNet
(sd-v1-5-inpainting's layout) is exported for the inpainting model path. Final uint8
images must agree within 2/255 (issue 13's bound) on every CPU backend present.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from runtime.bundle import demo_bundle  # noqa: E402
from runtime.pipeline import Pipeline, UsageError  # noqa: E402
from runtime.schedulers import SCHEDULERS  # noqa: E402
from tests.test_pipeline_parity import PROMPT, compare, reference  # noqa: E402

STRENGTHS = (0.3, 0.75, 1.0)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with edges: gradients, a disc and a bar (RGB)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / width
    g = 255 * y / height
    b = 128 + 100 * np.sin((x + 2 * y + seed) / 9)
    disc = (x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) / 4) ** 2
    rgb = np.stack([r, g, b], -1)
    rgb[disc] = (250, 240, 20)
    rgb[int(height * 0.7):int(height * 0.8), :] = (20, 30, 200)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def mask_picture(width: int, height: int, speckle: bool = False) -> Image.Image:
    """White (repaint) on a rectangle left of centre, black elsewhere (L); `speckle`
    flips random pixels too, so which pixel of each 8x8 cell the latent mask takes
    (diffusers' nearest interpolation: the top-left one) shows in the image."""
    y, x = np.mgrid[0:height, 0:width]
    inside = (x > width * 0.15) & (x < width * 0.55) & (y > height * 0.2) & (y < height * 0.75)
    if speckle:
        inside ^= np.random.default_rng(1).random((height, width)) < 0.3
    return Image.fromarray(np.where(inside, 255, 0).astype(np.uint8)).convert("L")


def as_pipeline(cls, base):
    """The same components and scheduler in another diffusers pipeline class."""
    return cls(base.vae, base.text_encoder, base.tokenizer, base.unet, base.scheduler, None, None,
               requires_safety_checker=False)


def run(pipe, generator_seed: int, **kw) -> np.ndarray:
    out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(generator_seed),
               output_type="np", **kw)
    return (out.images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module", params=["ort-cpu", "openvino"])
def ours(request):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    with Pipeline(demo_bundle(), request.param, precision="fp32", safety=False) as pipe:
        yield pipe


_REFS: dict = {}


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_img2img_matches_diffusers(demo_components, ours, scheduler, strength):
    image = picture(96, 80)  # img2img runs at the image's size (diffusers), here 96x80
    key = (scheduler, strength)
    if key not in _REFS:
        base = reference(demo_components, demo_bundle(), scheduler, safety=False)
        pipe = as_pipeline(diffusers.StableDiffusionImg2ImgPipeline, base)
        pipe.set_progress_bar_config(disable=True)
        _REFS[key] = run(pipe, 7, image=image, strength=strength, num_inference_steps=10,
                         guidance_scale=7.5)
    result = ours(PROMPT, image=image, strength=strength, steps=10, scheduler=scheduler,
                  guidance_scale=7.5, seed=7)
    assert (result.request.height, result.request.width) == (80, 96)
    compare(result.images, _REFS[key])


def test_img2img_runs_part_of_the_schedule(ours):
    """Strength 0.5 runs half the UNet calls (diffusers' get_timesteps), and says so."""
    image = picture(64, 64)
    full = ours(PROMPT, steps=20, scheduler="euler", seed=1, height=64, width=64)
    half = ours(PROMPT, image=image, strength=0.5, steps=20, scheduler="euler", seed=1)
    assert len(full.unet_calls) == 20 and len(half.unet_calls) == 10
    assert half.request.unet_calls == 10 and "vae_encoder" in half.timings


def test_img2img_batch_and_no_guidance_match_diffusers(demo_components, ours):
    """Two images per prompt share the image's latent sample (diffusers repeats it) and
    draw their noise together; without guidance the UNet runs one half."""
    image = picture(64, 72, seed=3)
    base = reference(demo_components, demo_bundle(), "euler_a", safety=False)
    pipe = as_pipeline(diffusers.StableDiffusionImg2ImgPipeline, base)
    pipe.set_progress_bar_config(disable=True)
    for guidance in (7.5, 1.0):
        ref = run(pipe, 5, image=image, strength=0.6, num_inference_steps=8,
                  guidance_scale=guidance, num_images_per_prompt=2)
        got = ours(PROMPT, image=image, strength=0.6, steps=8, scheduler="euler_a",
                   guidance_scale=guidance, seed=5, batch_size=2)
        compare(got.images, ref)


def test_img2img_several_prompts_at_an_odd_image_size_match_diffusers(demo_components, ours):
    """Two prompts x two images from a 101x75 image (output 96x72, diffusers' rounding),
    their own negative prompts; and one side given, the other from the image."""
    image = picture(101, 75, seed=5)
    base = reference(demo_components, demo_bundle(), "dpmpp_2m_karras", safety=False)
    pipe = as_pipeline(diffusers.StableDiffusionImg2ImgPipeline, base)
    pipe.set_progress_bar_config(disable=True)
    prompts, negatives = [PROMPT, "a red apple"], ["blurry", "low quality"]
    out = pipe(prompts, negative_prompt=negatives, image=image, strength=0.7,
               num_inference_steps=9, num_images_per_prompt=2,
               generator=torch.Generator("cpu").manual_seed(8), output_type="np")
    got = ours(prompts, negatives, image=image, strength=0.7, steps=9,
               scheduler="dpmpp_2m_karras", seed=8, batch_size=2)
    assert got.images.shape == (4, 72, 96, 3)
    compare(got.images, (out.images * 255).round().astype(np.uint8))
    assert ours.request(PROMPT, image=image, height=64).width == 96  # diffusers' rule


def test_inpainting_without_guidance_and_a_mask_of_another_size(demo_components, ours):
    image, mask = picture(128, 96, seed=1), mask_picture(50, 37, speckle=True)
    base = reference(demo_components, demo_bundle(), "lms", safety=False)
    pipe = as_pipeline(diffusers.StableDiffusionInpaintPipeline, base)
    pipe.set_progress_bar_config(disable=True)
    ref = run(pipe, 6, image=image, mask_image=mask, strength=0.8, num_inference_steps=7,
              guidance_scale=1.0, height=96, width=128)
    got = ours(PROMPT, image=image, mask=mask, strength=0.8, steps=7, scheduler="lms",
               guidance_scale=1.0, seed=6, height=96, width=128)
    compare(got.images, ref)


@pytest.mark.parametrize("scheduler,strength", [("pndm", 1.0), ("euler_a", 0.75),
                                                ("dpmpp_2m", 0.5)])
def test_inpainting_with_a_4_channel_unet_matches_diffusers(demo_components, ours, scheduler,
                                                            strength):
    """An ordinary model inpaints by diffusers' blend: after every step the kept region
    is the image's latents noised to the next step."""
    image, mask = picture(128, 96), mask_picture(128, 96)
    base = reference(demo_components, demo_bundle(), scheduler, safety=False)
    pipe = as_pipeline(diffusers.StableDiffusionInpaintPipeline, base)
    pipe.set_progress_bar_config(disable=True)
    ref = run(pipe, 9, image=image, mask_image=mask, strength=strength, num_inference_steps=10,
              guidance_scale=7.5, height=96, width=128)
    got = ours(PROMPT, image=image, mask=mask, strength=strength, steps=10, scheduler=scheduler,
               guidance_scale=7.5, seed=9, height=96, width=128)
    compare(got.images, ref)


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    """The demo model with a random 9-channel UNet (latents, mask, masked-image latents)."""
    from diffusers import UNet2DConditionModel

    from export.bundle_writer import export_bundle
    from export.components import build_components

    c = build_components("demo", seed=0)
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**c.unet.config, "in_channels": 9}).eval()
    c = type(c)(c.text_encoder, unet, c.vae, None, c.scheduler, c.tokenizer_dir, "demo-inpaint")
    bundle = export_bundle(c, tmp_path_factory.mktemp("inpaint") / "bundle", safety=False,
                           log=lambda msg: None)
    return c, bundle


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
@pytest.mark.parametrize("scheduler,strength", [("pndm", 1.0), ("euler_a", 1.0),
                                                ("lms", 0.75), ("ddim", 0.5)])
def test_an_inpainting_model_matches_diffusers(inpaint_model, backend, scheduler, strength):
    if backend == "openvino":
        pytest.importorskip("openvino")
    c, bundle = inpaint_model
    image, mask = picture(96, 64, seed=2), mask_picture(96, 64, speckle=True)
    base = reference(c, bundle, scheduler, safety=False)
    pipe = as_pipeline(diffusers.StableDiffusionInpaintPipeline, base)
    pipe.set_progress_bar_config(disable=True)
    ref = run(pipe, 4, image=image, mask_image=mask, strength=strength, num_inference_steps=8,
              guidance_scale=7.5, height=64, width=96, num_images_per_prompt=2)
    with Pipeline(bundle, backend, precision="fp32") as ours_:
        assert ours_.manifest.unet_channels == 9
        got = ours_(PROMPT, image=image, mask=mask, strength=strength, steps=8,
                    scheduler=scheduler, guidance_scale=7.5, seed=4, height=64, width=96,
                    batch_size=2)
        with pytest.raises(UsageError, match="inpainting model"):
            ours_.request(PROMPT)  # no image and mask: refused, one line
    compare(got.images, ref)

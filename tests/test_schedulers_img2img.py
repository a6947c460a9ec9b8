"""img2img and inpainting with the numpy schedulers vs diffusers 0.42, outside any pipeline.

Each loop does what StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline do
with the scheduler: set_timesteps, get_timesteps (start part-way, set_begin_index),
add_noise(image latents, noise, timesteps[:1]), then scale_model_input and step on a
deterministic fake UNet, eps = f(UNet input, t), evaluated on each side's own sample;
the inpainting loop re-noises the image after each step with add_noise at the next
timestep and blends it in under a mask. Noise comes from the same seeded CPU generator
(TorchCPUGenerator vs torch), so Euler ancestral's per-step draws continue the stream.
Config: the demo bundle's scheduler_config.json (steps_offset 1, as the pipeline sets).

Tolerance: max|ours - diffusers| / max|diffusers| <= 1e-5 for the final latents, 1e-6
for add_noise on its own. Measured on this machine (torch 2.13 CPU), strengths
0.3/0.75/1.0, steps 7/10/25: pndm 5.2e-7, ddim 5.2e-7, euler 1.4e-7, euler_a 3.9e-7,
lms 4.2e-7, dpmpp_2m 4.1e-7, dpmpp_2m_karras 7.8e-7; inpainting at most 5.9e-7;
add_noise alone at most 1.9e-7. add_noise is not bit-equal: torch's float32 sqrt on
this (AVX512) build rounds about one value in five an ulp off, and diffusers' sigmas and
sqrt(alpha_cumprod) go through it; numpy's sqrt is correctly rounded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import runtime
from runtime.rng import TorchCPUGenerator
from runtime.schedulers import CONFIG_OVERRIDES, DIFFUSERS_CLASS, SCHEDULERS, make_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIG = json.loads((Path(runtime.__file__).parent / "demo_bundle" / "scheduler_config.json").read_text())
SHAPE = (1, 4, 8, 8)
RTOL = 1e-5
ADD_NOISE_RTOL = 1e-6
F32 = np.float32


def _reference(name: str, steps: int, config: dict = CONFIG):
    if name == "lms":  # diffusers' LMSDiscreteScheduler integrates with scipy
        pytest.importorskip("scipy")
    ref = getattr(diffusers, DIFFUSERS_CLASS[name]).from_config({**config, **CONFIG_OVERRIDES[name]})
    ref.set_timesteps(steps)
    return ref


def _get_timesteps(ref, steps: int, strength: float):
    """diffusers' own StableDiffusionImg2ImgPipeline.get_timesteps on this scheduler."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img

    return img2img.StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=ref), steps, strength, "cpu")


def _fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    """Smooth, nonlinear in x and t: a stand-in for the UNet's eps. [B, 4, h, w] float32"""
    return (np.tanh(x) * F32(0.8 + 0.2 * np.cos(t / 250.0)) + F32(0.1) * x).astype(F32)


def _rel_err(ours: np.ndarray, ref) -> float:
    ref = ref.numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def run_both(name: str, steps: int, strength: float, *, inpaint: bool = False, seed: int = 0,
             shape: tuple[int, ...] = SHAPE) -> tuple[float, float]:
    """The img2img (or 4-channel inpainting) loop on both sides; returns the relative
    error of the final latents and the worst of inpainting's add_noise calls."""
    ref, ours = _reference(name, steps), make_schedule(name, CONFIG, steps)
    timesteps, n = _get_timesteps(ref, steps, strength)
    start = ours.start_index(strength)
    assert n >= 1 and start == len(ref.timesteps) - len(timesteps)
    data = np.random.default_rng(seed + 1)
    image = data.standard_normal(shape, dtype=F32)  # the "VAE-encoded" image
    mask = (data.random(shape[-2:]) > 0.5).astype(F32)  # [h, w]: 1 = repaint
    gen, rng = torch.Generator("cpu").manual_seed(seed), TorchCPUGenerator(seed)
    noise_ref, noise = torch.randn(shape, generator=gen), rng.randn(shape)
    image_ref, mask_ref = torch.from_numpy(image), torch.from_numpy(mask)
    x = np.empty(shape, F32)
    if inpaint and strength == 1.0:  # prepare_latents: pure noise at strength 1
        x_ref = noise_ref * ref.init_noise_sigma
        np.multiply(noise, F32(ours.init_noise_sigma), out=x)
    else:
        x_ref = ref.add_noise(image_ref, noise_ref, timesteps[:1])
        ours.add_noise(image, noise, start, out=x)
    state = ours.new_state(shape, rng, start)  # after the draws: Euler ancestral goes on
    kwargs = {"generator": gen} if "generator" in inspect.signature(ref.step).parameters else {}
    unet_input, proper, scratch = (np.empty(shape, F32) for _ in range(3))
    worst_noise = 0.0
    for k, t in enumerate(timesteps):
        i = start + k  # our call index is absolute
        eps_ref = _fake_unet(ref.scale_model_input(x_ref, t).numpy(), float(t))
        x_ref = ref.step(torch.from_numpy(eps_ref), t, x_ref, **kwargs).prev_sample
        eps = _fake_unet(ours.scale_model_input(x, i, unet_input), float(ours.timesteps[i]))
        ours.step(state, i, eps, x, rng, out=x)
        if inpaint:  # pipeline_stable_diffusion_inpaint.py, num_channels_unet == 4
            proper_ref = image_ref
            if k < len(timesteps) - 1:
                proper_ref = ref.add_noise(image_ref, noise_ref, torch.tensor([timesteps[k + 1]]))
                ours.add_noise(image, noise, i + 1, out=proper, scratch=scratch)
                worst_noise = max(worst_noise, _rel_err(proper, proper_ref))
            else:
                proper[...] = image
            x_ref = (1 - mask_ref) * proper_ref + mask_ref * x_ref
            x[...] = (F32(1) - mask) * proper + mask * x
    return _rel_err(x, x_ref), worst_noise


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("steps", [7, 10, 25])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_matches_diffusers(name, steps, strength):
    err, _ = run_both(name, steps, strength)
    assert err <= RTOL, f"{name} steps={steps} strength={strength}: rel err {err:.2e}"


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.9), (2, 0.5), (10, 0.1), (1, 1.0)])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_edges(name, steps, strength):
    """Start at call 1 (PNDM: its repeated timestep becomes the run's first call, and the
    run's second call redoes the step into its own timestep), one step left, one step."""
    err, _ = run_both(name, steps, strength, seed=3)
    assert err <= RTOL, f"{name} steps={steps} strength={strength}: rel err {err:.2e}"


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.75), (7, 0.3), (7, 1.0)])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_inpainting_matches_diffusers(name, steps, strength):
    err, noise_err = run_both(name, steps, strength, inpaint=True, seed=2)
    assert err <= RTOL and noise_err <= ADD_NOISE_RTOL, (name, steps, strength, err, noise_err)


def test_euler_ancestral_part_way_drawing_per_step():
    """A latent size that is not a multiple of 16 draws each step's noise when it comes."""
    err, _ = run_both("euler_a", 10, 0.5, shape=(1, 4, 3, 5), seed=4)
    assert err <= RTOL


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_at_every_index(name):
    """add_noise(x, n, i) == diffusers' add_noise at timesteps[i] with begin index i: what
    img2img uses at the start and inpainting after each step (step_index = i)."""
    ref, ours = _reference(name, 10), make_schedule(name, CONFIG, 10)
    data = np.random.default_rng(7)
    image, noise = data.standard_normal((2, *SHAPE), dtype=F32)
    out, scratch = np.empty(SHAPE, F32), np.empty(SHAPE, F32)
    for i in range(len(ours.timesteps)):
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(i)
        want = ref.add_noise(torch.from_numpy(image), torch.from_numpy(noise), ref.timesteps[i:i + 1])
        assert _rel_err(ours.add_noise(image, noise, i, out=out), want) <= ADD_NOISE_RTOL, (name, i)
        same = ours.add_noise(image, noise, i, out=np.empty(SHAPE, F32), scratch=scratch)
        assert np.array_equal(same, out)
        alias = image.copy()  # out may be either input
        assert np.array_equal(ours.add_noise(alias, noise, i, out=alias), out)
        alias = noise.copy()
        assert np.array_equal(ours.add_noise(image, alias, i, out=alias), out)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_start_index_matches_get_timesteps(name):
    configs = [CONFIG, {**CONFIG, "skip_prk_steps": False}] if name == "pndm" else [CONFIG]
    for config in configs:
        for steps in (1, 2, 3, 4, 7, 10, 25):
            if name == "pndm" and not config["skip_prk_steps"] and steps < 4:
                continue
            ref, ours = _reference(name, steps, config), make_schedule(name, config, steps)
            assert ours.order == ref.order == 1
            for strength in (0.0, 0.05, 0.1, 0.3, 0.5, 0.75, 0.99, 1.0):
                timesteps, n = _get_timesteps(ref, steps, strength)
                if (not config.get("skip_prk_steps", True) and n >= 1
                        and len(timesteps) < len(ref.timesteps)):  # PRK steps: refused
                    with pytest.raises(ValueError, match="skip_prk_steps=False"):
                        ours.start_index(strength)
                    continue
                start = ours.start_index(strength)
                if n < 1:  # the pipelines raise here; PNDM would still have a call left
                    assert start == len(ours.timesteps), (name, steps, strength)
                    continue
                assert start == len(ref.timesteps) - len(timesteps), (name, steps, strength)
                assert getattr(ref, "begin_index", start) == start


# sha256 (first 16 hex) of every UNet input and sample of full runs at steps 1, 2 and 7,
# recorded with the schedulers as they were before start / add_noise existed
BEFORE_START = {
    "pndm": "ad8f35f547251ec0", "ddim": "8e6cd65b34aa313e", "euler": "4751c9c7b6fb00be",
    "euler_a": "c02d5fe4b3380603", "lms": "6887c6bce88a616e", "dpmpp_2m": "2b6868d7171ddeb2",
    "dpmpp_2m_karras": "0e8336797d298d36",
}


def full_run_digest(name: str, start_api: bool) -> str:
    digest = hashlib.sha256()
    for steps in (1, 2, 7):
        sched, rng = make_schedule(name, CONFIG, steps), TorchCPUGenerator(5)
        x = rng.randn(SHAPE) * F32(sched.init_noise_sigma)
        if start_api:  # the img2img path at strength 1
            state = sched.new_state(SHAPE, rng, sched.start_index(1.0))
        else:
            state = sched.new_state(SHAPE, rng)
        outputs, eps, unet_input = np.random.default_rng(1), np.empty(SHAPE, F32), np.empty(SHAPE, F32)
        for i in range(len(sched.timesteps)):
            digest.update(sched.scale_model_input(x, i, unet_input).tobytes())
            eps[...] = outputs.standard_normal(SHAPE, dtype=F32)
            digest.update(sched.step(state, i, eps, x, rng, out=x).tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_start_zero_is_bit_identical_to_before(name):
    assert full_run_digest(name, False) == full_run_digest(name, True) == BEFORE_START[name]


def test_bad_arguments():
    sched = make_schedule("euler", CONFIG, 10)
    for strength in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            sched.start_index(strength)
    assert sched.start_index(0.05) == 10  # int(10 * 0.05) == 0: nothing to run
    for start in (-1, 10, 2.0, True):
        with pytest.raises(ValueError, match="start"):
            sched.new_state(SHAPE, None, start)
    prk = make_schedule("pndm", {**CONFIG, "skip_prk_steps": False}, 10)
    prk.new_state(SHAPE, None, 0)
    with pytest.raises(ValueError, match="skip_prk_steps"):
        prk.new_state(SHAPE, None, prk.start_index(0.5))

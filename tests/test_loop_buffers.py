"""The denoising loop allocates no arrays (STYLE.md 4): schedulers write into the
buffers their state owns, the pipeline into buffers made before the loop."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from benchmarks.worker import BOOKKEEPING_BYTES
from runtime.backends import unavailable
from runtime.pipeline import Pipeline
from runtime.rng import TorchCPUGenerator
from runtime.schedulers import SCHEDULERS, make_schedule

V14 = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
       "clip_sample": False}
SHAPE = (2, 4, 16, 16)


def run(name: str, steps: int, in_place: bool, config=V14) -> list[np.ndarray]:
    sched = make_schedule(name, config, steps)
    rng = TorchCPUGenerator(5)
    x = rng.randn(SHAPE) * np.float32(sched.init_noise_sigma)
    state = sched.new_state(SHAPE, rng)
    outputs = np.random.default_rng(1)
    eps, unet_input, nxt = (np.empty(SHAPE, np.float32) for _ in range(3))
    seen = []
    for i in range(len(sched.timesteps)):
        seen.append(np.array(sched.scale_model_input(x, i, unet_input)))
        eps[...] = outputs.standard_normal(SHAPE, dtype=np.float32)
        keep = eps.copy()
        if in_place:
            sched.step(state, i, eps, x, rng, out=x)
        else:
            x, nxt = sched.step(state, i, eps, x, rng, out=nxt), x
        assert np.array_equal(eps, keep)  # model_output is only read
        seen.append(x.copy())
    return seen


@pytest.mark.parametrize("name", SCHEDULERS)
def test_in_place_and_separate_out_give_the_same_bits(name):
    for steps in (1, 2, 7):
        a, b = run(name, steps, True), run(name, steps, False)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), (name, steps)
    if name in ("pndm", "ddim"):
        config = {**V14, "skip_prk_steps": False, "clip_sample": True}
        a, b = run(name, 6, True, config), run(name, 6, False, config)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_euler_ancestral_noise_drawn_up_front_continues_the_stream():
    """Drawing every step's noise at new_state() equals drawing it step by step (torch's
    CPU randn works in blocks of 16) — checked against a shape that draws per step."""
    sched = make_schedule("euler_a", V14, 5)
    state = sched.new_state(SHAPE, TorchCPUGenerator(3))
    rng = TorchCPUGenerator(3)
    per_step = [rng.randn(SHAPE) for _ in range(5)]
    assert state.noise is not None and np.array_equal(state.noise, np.stack(per_step))
    assert sched.new_state((1, 1, 3, 3), TorchCPUGenerator(3)).noise is None  # 9 % 16 != 0


def peaks_per_step(pipe: Pipeline, **kwargs) -> list[int]:
    """tracemalloc's peak over each step's start (everything numpy/Python allocates)."""
    out, base = [], [0]

    def on_step(i: int, calls: int) -> None:
        out.append(tracemalloc.get_traced_memory()[1] - base[0])
        tracemalloc.reset_peak()
        base[0] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        base[0] = tracemalloc.get_traced_memory()[0]
        pipe("a red apple", progress=on_step, seed=0, **kwargs)
    finally:
        tracemalloc.stop()
    return out[1:]  # the first step's interval includes the set-up before the loop


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_the_loop_allocates_no_arrays(backend):
    """One latent at 256x256 is 16 KiB; what a step may allocate is the interpreter's and
    the libraries' bookkeeping (about 1 KiB, freed within the step), never an array."""
    if unavailable(backend):
        pytest.skip(f"{backend}: {unavailable(backend)}")
    latent = 4 * 32 * 32 * 4
    with Pipeline("demo", backend, safety=False) as pipe:
        for scheduler in SCHEDULERS:
            for guidance in (7.5, 1.0):
                pipe("warm", steps=2, scheduler=scheduler, guidance_scale=guidance,
                     height=256, width=256)
                peaks = peaks_per_step(pipe, steps=6, scheduler=scheduler,
                                       guidance_scale=guidance, height=256, width=256)
                assert max(peaks) < BOOKKEEPING_BYTES < latent, (scheduler, guidance, peaks)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_the_img2img_and_inpainting_loops_allocate_no_arrays(mode):
    """The same for img2img and for inpainting with a 4-channel UNet, whose blend after
    every step re-noises the image latents and mixes by the mask (a [B, 1, h, w] mask
    operand made numpy allocate a broadcast temporary per step: the mask is 4-channel)."""
    latent = 4 * 32 * 32 * 4
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    mask[64:192, 32:160] = 255
    extra = {"image": image, "strength": 0.9}
    if mode == "inpaint":
        extra["mask"] = mask
    with Pipeline("demo", "ort-cpu", safety=False) as pipe:
        for scheduler in SCHEDULERS:
            pipe("warm", steps=4, scheduler=scheduler, **extra)
            peaks = peaks_per_step(pipe, steps=8, scheduler=scheduler, **extra)
            assert len(peaks) >= 5 and max(peaks) < BOOKKEEPING_BYTES < latent, (scheduler, peaks)

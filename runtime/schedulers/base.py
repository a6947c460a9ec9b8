"""What every numpy scheduler shares: frozen tables, per-run buffers, the step contract.

    state = sched.new_state(shape, rng)           # buffers for [B, 4, h, w], allocated once
    x = sched.scale_model_input(latents, i, out)  # writes `out` (or returns latents as is)
    latents = sched.step(state, i, eps, latents, rng, out=latents)  # writes `out`

`step` writes x_{i+1} into `out` and returns it; `out` may be `sample` itself (an
in-place update) but never `model_output`, which it only reads: it keeps no reference
to it, so the caller may reuse that buffer. Every product and sum is taken in the same
order as before `out=` existed, so results are bit-identical to that version.
Nothing here allocates per step: the state owns the scratch arrays and histories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

F32 = np.float32


class State:
    """Per-run buffers of one [B, 4, h, w] float32 shape: `tmp` scratch arrays, and what a
    multistep scheduler keeps (subclasses)."""

    def __init__(self, shape: tuple[int, ...], scratch: int = 1):
        self.shape = tuple(shape)
        self.tmp = [np.empty(self.shape, F32) for _ in range(scratch)]


@dataclass(frozen=True)
class Schedule:
    """The frozen tables of one scheduler for one step count."""

    name: str
    timesteps: np.ndarray  # [calls] float32: the UNet's timestep at call i
    init_noise_sigma: float

    def new_state(self, shape: tuple[int, ...], rng: Any = None) -> State:
        """Buffers for one run at latent `shape`. Called after the initial latents are
        drawn: a sampler that draws noise (Euler ancestral) continues `rng` from there."""
        return State(shape)

    def scale_model_input(self, sample: np.ndarray, i: int, out: np.ndarray) -> np.ndarray:
        """The UNet's input at call i, written into `out`, or `sample` itself when the
        scheduler does not scale it (PNDM, DDIM, DPM++)."""
        return sample

    def step(self, state: Any, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng: Any, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class SigmaSchedule(Schedule):
    """k-diffusion style samplers (Euler, Euler ancestral, LMS): the UNet sees
    x / sqrt(sigma^2 + 1) (Karras et al. 2022, table 1, c_in)."""

    sigmas: np.ndarray  # [calls + 1] float32
    input_scale: np.ndarray  # [calls] float32: 1 / sqrt(sigma^2 + 1)

    def scale_model_input(self, sample: np.ndarray, i: int, out: np.ndarray) -> np.ndarray:
        return np.multiply(sample, self.input_scale[i], out=out)


def linear_step(sample_coeff: np.floating, output_coeff: np.floating, model_output: np.ndarray,
                sample: np.ndarray, tmp: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = output_coeff * model_output + sample_coeff * sample (the one-step update of
    Euler, DDIM without clipping and PNDM's transfer), through one scratch array."""
    np.multiply(model_output, output_coeff, out=tmp)
    np.multiply(sample, sample_coeff, out=out)
    out += tmp
    return out

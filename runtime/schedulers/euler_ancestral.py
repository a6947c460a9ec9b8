"""Euler ancestral (k-diffusion sample_euler_ancestral, eta = 1; Karras et al. 2022);
diffusers schedulers/scheduling_euler_ancestral_discrete.py. Draws fresh noise every
step from the run's generator, like diffusers' randn_tensor on a CPU generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.schedulers._tables import discrete_sigmas, resolve, x0_coefficients
from runtime.schedulers.base import SigmaSchedule, State

DEFAULTS: dict = {}


PREDRAW_BYTES = 32 << 20  # noise of all steps drawn up front up to this size


class AncestralState(State):
    """Scratch, and the noise of every step of the run (calls start .. calls - 1) drawn at
    once (so the loop allocates nothing) when that continues the generator's stream
    exactly: torch's CPU randn works in blocks of 16 values, so for a step size that is a
    multiple of 16 one [draws, B, 4, h, w] draw equals `draws` draws of [B, 4, h, w] in a
    row. One image's [4, h, w] must be (h * w a multiple of 4): per-image seeds draw each
    image's [draws, 1, 4, h, w] from its own generator, which must equal what that image
    alone draws (B = 1). Past PREDRAW_BYTES (e.g. 1000
    steps at 1024x1024) each step draws its own."""

    def __init__(self, shape: tuple[int, ...], calls: int, rng: Any, start: int):
        super().__init__(shape, start=start)
        size, draws = math.prod(shape), calls - start  # one draw per call of this run
        fits = math.prod(shape[1:]) % 16 == 0 and draws * size * 4 <= PREDRAW_BYTES
        self.noise = rng.randn((draws, *shape)) if fits else None  # [draws, B, 4, h, w]


@dataclass(frozen=True)
class EulerAncestralSchedule(SigmaSchedule):
    sample_coeff: np.ndarray  # [calls] f32: prev = sample_coeff x + output_coeff out + up noise
    output_coeff: np.ndarray
    sigma_up: np.ndarray

    def _state(self, shape: tuple[int, ...], rng: Any, start: int) -> AncestralState:
        return AncestralState(shape, len(self.timesteps), rng, start)

    def step(self, state: AncestralState, i: int, model_output: np.ndarray,
             sample: np.ndarray, rng: Any, out: np.ndarray) -> np.ndarray:
        tmp = state.tmp[0]
        np.multiply(model_output, self.output_coeff[i], out=tmp)
        np.multiply(sample, self.sample_coeff[i], out=out)
        tmp += out
        # [B, 4, h, w]: one draw for the whole batch, from the run's generator
        noise = state.noise[i - state.start] if state.noise is not None else rng.randn(model_output.shape)
        np.multiply(noise, self.sigma_up[i], out=out)
        out += tmp
        return out


def make(name: str, config: dict, steps: int) -> EulerAncestralSchedule:
    cfg = resolve(config, DEFAULTS)
    if cfg["prediction_type"] == "sample":  # diffusers raises NotImplementedError too
        raise ValueError("Euler ancestral supports prediction_type epsilon or v_prediction")
    ts, sigmas, init = discrete_sigmas(cfg, steps, allow_karras=False)
    s = sigmas.astype(np.float64)
    sigma, nxt = s[:-1], s[1:]
    # k-diffusion get_ancestral_step: split the move to sigma_next into down + fresh noise
    up = nxt * np.sqrt(sigma**2 - nxt**2) / sigma  # sqrt(next^2 (sigma^2 - next^2) / sigma^2)
    down = nxt**2 / sigma  # sqrt(next^2 - up^2)
    p, q = x0_coefficients(cfg["prediction_type"], sigma)
    dt = down - sigma
    sample_coeff, output_coeff = 1 + (1 - p) * dt / sigma, -q * dt / sigma
    return EulerAncestralSchedule.build(name, steps, ts, sigmas, init, sample_coeff, output_coeff, up)

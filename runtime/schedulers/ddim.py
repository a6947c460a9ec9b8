"""DDIM, eta = 0: Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12;
diffusers schedulers/scheduling_ddim.py (eta > 0 and thresholding are not supported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.schedulers._tables import alphas_cumprod, ddpm_noise_scales, frozen, resolve, spaced_timesteps
from runtime.schedulers.base import F32, Schedule, State, linear_step

DEFAULTS = {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
            "thresholding": False, "timestep_spacing": "leading"}


@dataclass(frozen=True)
class DDIMSchedule(Schedule):
    clip: float | None  # clip_sample_range when clip_sample, else None
    # x0 = x0_s * x + x0_m * out; eps = eps_s * x + eps_m * out; prev = sqrt(a') x0 + dir * eps
    x0_s: np.ndarray
    x0_m: np.ndarray
    eps_s: np.ndarray
    eps_m: np.ndarray
    sqrt_a_prev: np.ndarray
    direction: np.ndarray
    sample_coeff: np.ndarray  # without clipping: prev = sample_coeff * x + output_coeff * out
    output_coeff: np.ndarray

    def _state(self, shape: tuple[int, ...], rng: Any, start: int) -> State:
        return State(shape, scratch=2, start=start)

    def step(self, state: State, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng: Any, out: np.ndarray) -> np.ndarray:
        x0, tmp = state.tmp  # [B, 4, h, w]
        if self.clip is None:
            return linear_step(self.sample_coeff[i], self.output_coeff[i], model_output,
                               sample, tmp, out)
        np.multiply(model_output, self.x0_m[i], out=x0)
        np.multiply(sample, self.x0_s[i], out=tmp)
        x0 += tmp
        np.clip(x0, -self.clip, self.clip, out=x0)
        x0 *= self.sqrt_a_prev[i]
        np.multiply(model_output, self.direction[i] * self.eps_m[i], out=tmp)
        x0 += tmp
        np.multiply(sample, self.direction[i] * self.eps_s[i], out=tmp)
        return np.add(x0, tmp, out=out)


def make(name: str, config: dict, steps: int) -> DDIMSchedule:
    cfg = resolve(config, DEFAULTS)
    if cfg["thresholding"]:
        raise ValueError("DDIM thresholding is not supported by the numpy schedulers")
    n = int(cfg["num_train_timesteps"])
    if steps > n:
        raise ValueError(f"DDIM steps {steps} exceed num_train_timesteps {n}")
    ac = alphas_cumprod(cfg).astype(np.float64)
    ts = spaced_timesteps(cfg, steps)
    ts = (ts.round() if cfg["timestep_spacing"] == "linspace" else ts).astype(np.int64)
    prev = ts - n // steps
    a = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0 if cfg["set_alpha_to_one"] else ac[0])
    sa, sb = np.sqrt(a), np.sqrt(1 - a)
    one, zero = np.ones_like(a), np.zeros_like(a)
    kind = cfg["prediction_type"]
    if kind == "epsilon":  # x0 = (x - sqrt(b) eps) / sqrt(a)   (DDIM eq. 9)
        coeffs = (1 / sa, -sb / sa, zero, one)
    elif kind == "v_prediction":  # Salimans & Ho 2022 eq. 9
        coeffs = (sa, -sb, sb, sa)
    else:  # "sample": eps = (x - sqrt(a) x0) / sqrt(b)
        coeffs = (zero, one, 1 / sb, -sa / sb)
    x0_s, x0_m, eps_s, eps_m = coeffs
    sqrt_a_prev, direction = np.sqrt(a_prev), np.sqrt(1 - a_prev)
    folded = (sqrt_a_prev * x0_s + direction * eps_s, sqrt_a_prev * x0_m + direction * eps_m)
    tables = [c.astype(F32) for c in (*coeffs, sqrt_a_prev, direction)]
    clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
    ts32, signal, noise = frozen(ts.astype(F32), *ddpm_noise_scales(ac, ts))
    return DDIMSchedule(name, ts32, 1.0, steps, signal, noise, clip,
                        *frozen(*tables, *(c.astype(F32) for c in folded)))

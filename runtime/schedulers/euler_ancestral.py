"""Euler ancestral (k-diffusion sample_euler_ancestral, eta = 1; Karras et al. 2022);
diffusers schedulers/scheduling_euler_ancestral_discrete.py. Draws fresh noise every
step from the run's generator, like diffusers' randn_tensor on a CPU generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.schedulers._tables import F32, discrete_sigmas, frozen, resolve, x0_coefficients

DEFAULTS: dict = {}


@dataclass(frozen=True)
class EulerAncestralSchedule:
    name: str
    timesteps: np.ndarray  # [calls] float32
    init_noise_sigma: float
    sigmas: np.ndarray  # [calls + 1] float32
    input_scale: np.ndarray  # [calls] float32: 1 / sqrt(sigma^2 + 1)
    sample_coeff: np.ndarray  # [calls] f32: prev = sample_coeff x + output_coeff out + up noise
    output_coeff: np.ndarray
    sigma_up: np.ndarray

    def new_state(self) -> None:
        return None

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample * self.input_scale[i]

    def step(self, state, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng) -> np.ndarray:
        out = model_output * self.output_coeff[i]
        out += self.sample_coeff[i] * sample
        noise = rng.randn(model_output.shape)  # [B, 4, h, w]: one draw for the whole batch
        noise *= self.sigma_up[i]
        out += noise
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
    tables = frozen(ts, sigmas, *(a.astype(F32) for a in (1 / np.sqrt(sigma**2 + 1),
                                                            sample_coeff, output_coeff, up)))
    return EulerAncestralSchedule(name, tables[0], init, *tables[1:])

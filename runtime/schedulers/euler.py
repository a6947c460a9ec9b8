"""Euler (Karras et al. 2022, "Elucidating the Design Space...", algorithm 2 with
s_churn = 0); diffusers schedulers/scheduling_euler_discrete.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.schedulers._tables import F32, discrete_sigmas, frozen, resolve, x0_coefficients

DEFAULTS = {"interpolation_type": "linear", "use_karras_sigmas": False,
            "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None,
            "sigma_max": None, "timestep_type": "discrete", "final_sigmas_type": "zero"}


@dataclass(frozen=True)
class EulerSchedule:
    name: str
    timesteps: np.ndarray  # [calls] float32
    init_noise_sigma: float
    sigmas: np.ndarray  # [calls + 1] float32
    input_scale: np.ndarray  # [calls] float32: 1 / sqrt(sigma^2 + 1)
    sample_coeff: np.ndarray  # [calls] float32: prev = sample_coeff * x + output_coeff * out
    output_coeff: np.ndarray

    def new_state(self) -> None:
        return None

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample * self.input_scale[i]

    def step(self, state, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng=None) -> np.ndarray:
        out = model_output * self.output_coeff[i]
        out += self.sample_coeff[i] * sample
        return out  # [B, 4, h, w] float32


def make(name: str, config: dict, steps: int) -> EulerSchedule:
    cfg = resolve(config, DEFAULTS)
    ts, sigmas, init = discrete_sigmas(cfg, steps, allow_karras=True)
    s = sigmas.astype(np.float64)
    sigma, dt = s[:-1], s[1:] - s[:-1]
    p, q = x0_coefficients(cfg["prediction_type"], sigma)
    # x_next = x + (x - x0) / sigma * dt   (Karras 2022 eq. 6, one Euler step)
    sample_coeff, output_coeff = 1 + (1 - p) * dt / sigma, -q * dt / sigma
    tables = frozen(ts, sigmas, *(a.astype(F32) for a in (1 / np.sqrt(sigma**2 + 1),
                                                            sample_coeff, output_coeff)))
    return EulerSchedule(name, tables[0], init, *tables[1:])

"""Euler (Karras et al. 2022, "Elucidating the Design Space...", algorithm 2 with
s_churn = 0); diffusers schedulers/scheduling_euler_discrete.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.schedulers._tables import discrete_sigmas, resolve, x0_coefficients
from runtime.schedulers.base import SigmaSchedule, State, linear_step

DEFAULTS = {"interpolation_type": "linear", "use_karras_sigmas": False,
            "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None,
            "sigma_max": None, "timestep_type": "discrete", "final_sigmas_type": "zero"}


@dataclass(frozen=True)
class EulerSchedule(SigmaSchedule):
    sample_coeff: np.ndarray  # [calls] float32: prev = sample_coeff * x + output_coeff * out
    output_coeff: np.ndarray

    def step(self, state: State, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng: Any, out: np.ndarray) -> np.ndarray:
        return linear_step(self.sample_coeff[i], self.output_coeff[i], model_output, sample,
                           state.tmp[0], out)  # [B, 4, h, w] float32


def make(name: str, config: dict, steps: int) -> EulerSchedule:
    cfg = resolve(config, DEFAULTS)
    ts, sigmas, init = discrete_sigmas(cfg, steps, allow_karras=True)
    s = sigmas.astype(np.float64)
    sigma, dt = s[:-1], s[1:] - s[:-1]
    p, q = x0_coefficients(cfg["prediction_type"], sigma)
    # x_next = x + (x - x0) / sigma * dt   (Karras 2022 eq. 6, one Euler step)
    sample_coeff, output_coeff = 1 + (1 - p) * dt / sigma, -q * dt / sigma
    return EulerSchedule.build(name, steps, ts, sigmas, init, sample_coeff, output_coeff)

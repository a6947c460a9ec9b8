"""Linear multistep, order 4 (k-diffusion sample_lms; Karras et al. 2022 sigmas);
diffusers schedulers/scheduling_lms_discrete.py. The integrals of the Lagrange basis
that diffusers takes with scipy.integrate.quad are exact here with Gauss-Legendre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.schedulers._tables import F32, discrete_sigmas, resolve, x0_coefficients
from runtime.schedulers.base import SigmaSchedule, State

DEFAULTS = {"use_karras_sigmas": False, "use_exponential_sigmas": False,
            "use_beta_sigmas": False}
ORDER = 4  # LMSDiscreteScheduler.step(order=4), what the pipelines use


class LMSState(State):
    """Per-run history of derivatives (x - x0) / sigma: a ring of ORDER buffers."""

    def __init__(self, shape: tuple[int, ...], start: int):
        super().__init__(shape, start=start)
        self.ring = [np.empty(self.shape, F32) for _ in range(ORDER)]
        self.count = 0  # derivatives written so far; the newest is ring[(count - 1) % ORDER]


@dataclass(frozen=True)
class LMSSchedule(SigmaSchedule):
    deriv_s: np.ndarray  # [calls] f32: d = deriv_s * x + deriv_m * out
    deriv_m: np.ndarray
    coeffs: np.ndarray  # [calls, ORDER] float32: weight of the k-th newest derivative

    def _state(self, shape: tuple[int, ...], rng: Any, start: int) -> LMSState:
        return LMSState(shape, start)

    def step(self, state: LMSState, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng: Any, out: np.ndarray) -> np.ndarray:
        tmp = state.tmp[0]
        d = state.ring[state.count % ORDER]
        np.multiply(model_output, self.deriv_m[i], out=d)
        if self.deriv_s[i] != 0:
            np.multiply(sample, self.deriv_s[i], out=tmp)
            d += tmp
        state.count += 1
        if out is not sample:
            np.copyto(out, sample)
        # newest first. coeffs[i] has order min(i + 1, ORDER) from the absolute index; a run
        # that starts part-way has fewer derivatives, and diffusers' zip() then uses just
        # the first weights of that higher-order rule: so do we
        for k in range(min(state.count, ORDER)):
            np.multiply(state.ring[(state.count - 1 - k) % ORDER], self.coeffs[i, k], out=tmp)
            out += tmp
        return out  # [B, 4, h, w] float32


def _lms_coefficients(sigmas: np.ndarray, steps: int) -> np.ndarray:
    """[steps, ORDER]: integral over [sigma_i, sigma_i+1] of each Lagrange basis polynomial
    through the last `order` sigmas (k-diffusion linear_multistep_coeff)."""
    nodes, weights = np.polynomial.legendre.leggauss(ORDER)  # exact to degree 2 * ORDER - 1
    out = np.zeros((steps, ORDER))
    for i in range(steps):
        order = min(i + 1, ORDER)
        a, b = sigmas[i], sigmas[i + 1]
        tau = (b - a) / 2 * nodes + (a + b) / 2
        for k in range(order):
            basis = np.ones_like(tau)
            for j in range(order):
                if j != k:
                    basis *= (tau - sigmas[i - j]) / (sigmas[i - k] - sigmas[i - j])
            out[i, k] = (b - a) / 2 * np.dot(weights, basis)
    return out


def make(name: str, config: dict, steps: int) -> LMSSchedule:
    cfg = resolve(config, DEFAULTS)
    ts, sigmas, init = discrete_sigmas(cfg, steps, allow_karras=True)
    s = sigmas.astype(np.float64)
    sigma = s[:-1]
    p, q = x0_coefficients(cfg["prediction_type"], sigma)
    return LMSSchedule.build(name, steps, ts, sigmas, init, (1 - p) / sigma, -q / sigma,
                             _lms_coefficients(s, steps))

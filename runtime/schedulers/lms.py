"""Linear multistep, order 4 (k-diffusion sample_lms; Karras et al. 2022 sigmas);
diffusers schedulers/scheduling_lms_discrete.py. The integrals of the Lagrange basis
that diffusers takes with scipy.integrate.quad are exact here with Gauss-Legendre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.schedulers._tables import F32, discrete_sigmas, frozen, resolve, x0_coefficients

DEFAULTS = {"use_karras_sigmas": False, "use_exponential_sigmas": False,
            "use_beta_sigmas": False}
ORDER = 4  # LMSDiscreteScheduler.step(order=4), what the pipelines use


@dataclass
class LMSState:
    """Per-run history of derivatives (x - x0) / sigma, newest last."""
    derivatives: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class LMSSchedule:
    name: str
    timesteps: np.ndarray  # [calls] float32
    init_noise_sigma: float
    sigmas: np.ndarray  # [calls + 1] float32
    input_scale: np.ndarray  # [calls] float32: 1 / sqrt(sigma^2 + 1)
    deriv_s: np.ndarray  # [calls] f32: d = deriv_s * x + deriv_m * out
    deriv_m: np.ndarray
    coeffs: np.ndarray  # [calls, ORDER] float32: weight of the k-th newest derivative

    def new_state(self) -> LMSState:
        return LMSState()

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample * self.input_scale[i]

    def step(self, state: LMSState, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng=None) -> np.ndarray:
        d = model_output * self.deriv_m[i]
        if self.deriv_s[i] != 0:
            d += self.deriv_s[i] * sample
        state.derivatives = [*state.derivatives[-(ORDER - 1):], d]
        out = sample.copy()
        for c, deriv in zip(self.coeffs[i], reversed(state.derivatives), strict=False):
            out += c * deriv
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
    tables = frozen(ts, sigmas, *(a.astype(F32) for a in (
        1 / np.sqrt(sigma**2 + 1), (1 - p) / sigma, -q / sigma, _lms_coefficients(s, steps))))
    return LMSSchedule(name, tables[0], init, *tables[1:])

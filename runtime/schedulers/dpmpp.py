"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++", algorithm 2 (data prediction,
multistep, midpoint or Heun form), optionally on Karras sigmas; diffusers
schedulers/scheduling_dpmsolver_multistep.py with algorithm_type "dpmsolver++".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.schedulers._tables import (
    F32,
    alphas_cumprod,
    frozen,
    karras,
    resolve,
    sigma_to_t,
    train_sigmas,
    x0_coefficients,
)
from runtime.schedulers.base import Schedule, State

DEFAULTS = {"solver_order": 2, "thresholding": False, "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
            "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
            "lambda_min_clipped": -float("inf"), "variance_type": None}


class DPMState(State):
    """Two data-prediction buffers: this step's and the previous step's x0."""

    def __init__(self, shape: tuple[int, ...], start: int):
        super().__init__(shape, start=start)
        self.x0 = np.empty(self.shape, F32)
        self.prev_x0 = np.empty(self.shape, F32)


@dataclass(frozen=True)
class DPMSchedule(Schedule):
    sigmas: np.ndarray  # [calls + 1] float32
    x0_s: np.ndarray  # [calls] f32: x0 = x0_s * x + x0_m * out
    x0_m: np.ndarray
    sample_coeff: np.ndarray  # [calls] f32: prev = sample_coeff x + c0 x0 + c1 x0_prev
    c0: np.ndarray
    c1: np.ndarray
    c0_first: np.ndarray  # [calls] f32: c0 of a first-order step (c1 = 0), a run's first

    def _state(self, shape: tuple[int, ...], rng: Any, start: int) -> DPMState:
        return DPMState(shape, start)

    def step(self, state: DPMState, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng: Any, out: np.ndarray) -> np.ndarray:
        x0, tmp = state.x0, state.tmp[0]  # [B, 4, h, w]
        np.multiply(model_output, self.x0_m[i], out=x0)
        np.multiply(sample, self.x0_s[i], out=tmp)
        x0 += tmp
        first = i == state.start  # diffusers' lower_order_nums == 0: no x0_prev yet
        np.multiply(sample, self.sample_coeff[i], out=tmp)  # before `out` may overwrite sample
        np.multiply(x0, self.c0_first[i] if first else self.c0[i], out=out)
        out += tmp
        if not first and self.c1[i] != 0:
            np.multiply(state.prev_x0, self.c1[i], out=tmp)
            out += tmp
        state.x0, state.prev_x0 = state.prev_x0, x0
        return out


def _timesteps(cfg: dict, steps: int, ac: np.ndarray) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    lambdas = 0.5 * (np.log(ac.astype(np.float64)) - np.log1p(-ac.astype(np.float64)))
    last = n - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ts = (np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1]
        return ts.astype(np.int64) + int(cfg["steps_offset"])
    if spacing == "trailing":
        return np.arange(last, 0, -n / steps).round().astype(np.int64) - 1
    raise ValueError(f"unsupported timestep_spacing {spacing!r}")


def make(name: str, config: dict, steps: int) -> DPMSchedule:
    cfg = resolve(config, DEFAULTS)
    algorithm = "dpmsolver++" if cfg["algorithm_type"] == "deis" else cfg["algorithm_type"]
    solver = "midpoint" if cfg["solver_type"] in ("logrho", "bh1", "bh2") else cfg["solver_type"]
    unsupported = {"algorithm_type": algorithm != "dpmsolver++",
                   "thresholding": cfg["thresholding"],
                   "solver_order": cfg["solver_order"] not in (1, 2),
                   "solver_type": solver not in ("midpoint", "heun"),
                   "variance_type": cfg["variance_type"] is not None,
                   **{k: bool(cfg[k]) for k in ("use_exponential_sigmas", "use_beta_sigmas",
                                                "use_lu_lambdas", "use_flow_sigmas")}}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"DPM-Solver++ 2M: unsupported {bad[0]}={cfg[bad[0]]!r}")
    ac = alphas_cumprod(cfg)
    train = train_sigmas(ac)
    ts = _timesteps(cfg, steps, ac)
    if cfg["use_karras_sigmas"]:
        sigmas = karras(float(train[0]), float(train[-1]), steps)
        ts = sigma_to_t(sigmas, np.log(train))
        ts = ts if cfg["beta_schedule"] == "squaredcos_cap_v2" else ts.round()
    else:
        sigmas = np.interp(ts, np.arange(len(train)), train)
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(f"unsupported final_sigmas_type {cfg['final_sigmas_type']!r}")
    last = float(train[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(F32)
    calls = len(ts)
    s = sigmas.astype(np.float64)
    alpha = 1 / np.sqrt(s**2 + 1)  # VP alpha_t, sigma_t = s * alpha_t  (_sigma_to_alpha_sigma_t)
    with np.errstate(divide="ignore"):
        lam = -np.log(s)  # log(alpha_t) - log(sigma_t); +inf at sigma = 0
    x0_s, x0_m = x0_coefficients(cfg["prediction_type"], s[:-1])
    x0_s = x0_s / alpha[:-1]  # x0_coefficients is for x / alpha (Karras scaling)
    sample_coeff, c0, c1, c0_first = (np.zeros(calls) for _ in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):  # h = 0: Karras end at sigma_min
        for i in range(calls):
            h = lam[i + 1] - lam[i]
            em1 = np.expm1(-h)  # exp(-h) - 1
            sample_coeff[i] = s[i + 1] * alpha[i + 1] / (s[i] * alpha[i])
            c0_first[i] = -alpha[i + 1] * em1
            final = i == calls - 1 and (cfg["euler_at_final"] or cfg["final_sigmas_type"] == "zero"
                                        or (cfg["lower_order_final"] and calls < 15))
            if cfg["solver_order"] == 1 or i == 0 or final:  # DPM-Solver++ eq. 5, first order
                c0[i] = c0_first[i]
                continue
            r = (lam[i] - lam[i - 1]) / h  # r0 = h_0 / h; D1 = (x0 - x0_prev) / r0
            d1 = -0.5 * alpha[i + 1] * em1 if solver == "midpoint" else alpha[i + 1] * (em1 / h + 1)
            c0[i] = -alpha[i + 1] * em1 + d1 / r
            c1[i] = -d1 / r
    tables = (x0_s, x0_m, sample_coeff, c0, c1, c0_first)
    # add_noise: alpha_t x + sigma_t n in float32 (_sigma_to_alpha_sigma_t, add_noise)
    sigma = sigmas[:-1]  # [calls] float32
    alpha_t = F32(1.0) / np.sqrt(sigma**2 + F32(1.0))
    return DPMSchedule(name, frozen(ts.astype(F32))[0], 1.0, steps, *frozen(
        alpha_t, sigma * alpha_t, sigmas, *(a.astype(F32) for a in tables)))

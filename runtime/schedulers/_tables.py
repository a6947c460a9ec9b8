"""Frozen tables shared by the schedulers: betas, alphas_cumprod, timesteps, sigmas.

Each function mirrors one piece of diffusers 0.42 (schedulers/scheduling_*.py); the
train-time tables are float32 like diffusers' torch tensors, derived tables float64
until they are cast for use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

F32 = np.float32
MAX_TRAIN_TIMESTEPS = 100_000  # SD uses 1000; a bound so a config cannot ask for 1e9 tables

# Defaults every diffusers scheduler class shares (its __init__ signature).
COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
    "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
}


def resolve(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Keys the class knows, from ``config`` or the class default (like ``from_config``)."""
    merged = {**COMMON_DEFAULTS, **defaults}
    out = {k: config[k] if k in config else v for k, v in merged.items()}
    n = out["num_train_timesteps"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"num_train_timesteps must be an integer in [1, {MAX_TRAIN_TIMESTEPS}], "
                         f"got {n!r}")
    for k in ("beta_start", "beta_end"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"{k} must be a number in (0, 1), got {v!r}")
    betas = out["trained_betas"]
    if betas is not None and (not isinstance(betas, list) or len(betas) != n or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas)):
        raise ValueError(f"trained_betas must be {n} numbers in (0, 1) (num_train_timesteps)")
    if out["timestep_spacing"] not in ("linspace", "leading", "trailing"):
        raise ValueError(f"unsupported timestep_spacing {out['timestep_spacing']!r}")
    if out["rescale_betas_zero_snr"]:
        raise ValueError("rescale_betas_zero_snr=True is not supported by the numpy schedulers")
    if out["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {out['prediction_type']!r}")
    return out


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(..., dtype=float32) on the CPU: float32 step, fused multiply-add from
    whichever end is nearer (RangeFactoriesKernel.cpp); bit-exact on the x86 builds."""
    a, b = F32(start), F32(end)
    step = np.float64((b - a) / F32(max(n - 1, 1)))
    idx = np.arange(n)
    return np.where(idx < n // 2, np.float64(a) + step * idx, np.float64(b) - step * (n - 1 - idx)
                    ).astype(F32)


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
    """[T] float32 cumulative product of 1 - beta (scheduling_ddpm.py __init__)."""
    n = int(cfg["num_train_timesteps"])
    schedule = cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], F32)
    elif schedule == "linear":
        betas = _linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif schedule == "scaled_linear":  # linspace of sqrt(beta), squared in float32
        betas = _linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    elif schedule == "squaredcos_cap_v2":  # betas_for_alpha_bar, Nichol & Dhariwal 2021 eq. 17
        betas = np.array([min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999)
                          for i in range(n)], F32)
    else:
        raise ValueError(f"unsupported beta_schedule {schedule!r}")
    # torch.cumprod on the CPU accumulates float32 in double and rounds each output
    return np.cumprod((F32(1.0) - betas).astype(np.float64)).astype(F32)


def spaced_timesteps(cfg: Mapping[str, Any], steps: int) -> np.ndarray:
    """[steps] float64 descending timesteps for timestep_spacing (Lin et al. 2023 table 2)."""
    n, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (n // steps)).round()[::-1] + cfg["steps_offset"]
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)) - 1
    raise ValueError(f"unsupported timestep_spacing {spacing!r}")


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """[T] float32 sigma = sqrt((1 - a) / a), as diffusers computes it in torch float32."""
    return np.sqrt((F32(1.0) - ac) / ac)


def ddpm_noise_scales(ac: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[calls] float32 (sqrt(a_t), sqrt(1 - a_t)) at each call's timestep t: add_noise of
    scheduling_ddpm.py (PNDM and DDIM copy it), in torch's float32 arithmetic."""
    a = ac.astype(F32)[np.asarray(ts, np.int64)]
    return np.sqrt(a), np.sqrt(F32(1.0) - a)


def karras(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Karras et al. 2022 eq. 5, rho = 7 (scheduling_euler_discrete.py _convert_to_karras)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
    return (hi + ramp * (lo - hi)) ** 7.0


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Piecewise-linear inverse of log sigma(t) (scheduling_euler_discrete.py _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]  # [T, steps]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def x0_coefficients(prediction_type: str, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, q) with x0 = p * sample + q * model_output at Karras sigma (k-diffusion's denoiser)."""
    if prediction_type == "epsilon":
        return np.ones_like(sigma), -sigma
    if prediction_type == "v_prediction":  # Salimans & Ho 2022, in the sigma parameterization
        return 1 / (sigma**2 + 1), -sigma / np.sqrt(sigma**2 + 1)
    return np.zeros_like(sigma), np.ones_like(sigma)  # "sample"


def frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Read-only copies, so a Schedule's tables can't be mutated by a caller."""
    out = []
    for a in arrays:
        a = np.array(a)
        a.setflags(write=False)
        out.append(a)
    return tuple(out)


def discrete_sigmas(cfg: Mapping[str, Any], steps: int, *, allow_karras: bool
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """(timesteps [steps] f32, sigmas [steps + 1] f32, init_noise_sigma) of the k-diffusion
    style schedulers (scheduling_euler_discrete.py set_timesteps / init_noise_sigma)."""
    for key in ("use_exponential_sigmas", "use_beta_sigmas"):
        if cfg.get(key):
            raise ValueError(f"{key}=True is not supported by the numpy schedulers")
    if cfg.get("interpolation_type", "linear") != "linear":
        raise ValueError(f"unsupported interpolation_type {cfg['interpolation_type']!r}")
    continuous = cfg.get("timestep_type", "discrete") != "discrete"
    if continuous and cfg["prediction_type"] == "v_prediction":
        raise ValueError("timestep_type='continuous' is not supported by the numpy schedulers")
    ac = alphas_cumprod(cfg)
    train = train_sigmas(ac)  # [T] float32
    ts = spaced_timesteps(cfg, steps).astype(F32)
    sigmas = np.interp(ts, np.arange(len(train)), train)
    if cfg.get("use_karras_sigmas"):
        if not allow_karras:
            raise ValueError("use_karras_sigmas is not supported by this scheduler")
        lo = sigmas[-1] if cfg.get("sigma_min") is None else cfg["sigma_min"]
        hi = sigmas[0] if cfg.get("sigma_max") is None else cfg["sigma_max"]
        sigmas = karras(float(lo), float(hi), steps)
        ts = sigma_to_t(sigmas, np.log(train)).astype(F32)
    final_type = cfg.get("final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"unsupported final_sigmas_type {final_type!r}")
    last = float(train[0]) if final_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(F32)
    top = sigmas.max()
    init = top if cfg["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(top * top + 1)
    return ts, sigmas, float(init)

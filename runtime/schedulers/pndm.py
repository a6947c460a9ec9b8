"""PNDM with skip_prk_steps (PLMS): Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds", eq. 9 and 12; diffusers schedulers/scheduling_pndm.py.

N steps make N + 1 UNet calls for N >= 2: the second timestep is repeated, and that
call's output is averaged with the first (a 2nd-order warm-up on the first sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.schedulers._tables import F32, alphas_cumprod, frozen, resolve, spaced_timesteps

DEFAULTS = {"skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}

# Adams-Bashforth weights over the stored outputs, newest first (PNDM eq. 12)
_AB_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
               4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@dataclass
class PNDMState:
    """Per-run history: past model outputs (copies, newest last) and the warm-up sample."""
    ets: list[np.ndarray] = field(default_factory=list)
    cur_sample: np.ndarray | None = None


@dataclass(frozen=True)
class PNDMSchedule:
    name: str
    timesteps: np.ndarray  # [calls] float32
    init_noise_sigma: float
    sample_coeff: np.ndarray  # [calls] float32: prev = sample_coeff * x + output_coeff * eps
    output_coeff: np.ndarray  # [calls] float32

    def new_state(self) -> PNDMState:
        return PNDMState()

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def step(self, state: PNDMState, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng=None) -> np.ndarray:
        if i == 1 and len(self.timesteps) > 1:  # repeated timestep: average, restart from x_0
            eps = (model_output + state.ets[-1]) * F32(0.5)
            sample = state.cur_sample
        else:
            state.ets = [*state.ets[-3:], model_output.copy()]  # the caller may reuse its buffer
            if i == 0:
                state.cur_sample = sample.copy()
            weights = _AB_WEIGHTS[len(state.ets)]
            eps = state.ets[-1] * F32(weights[0])
            for w, e in zip(weights[1:], state.ets[-2::-1], strict=False):
                eps += F32(w) * e
        eps *= self.output_coeff[i]
        eps += self.sample_coeff[i] * sample
        return eps  # [B, 4, h, w] float32


def make(name: str, config: dict, steps: int) -> PNDMSchedule:
    cfg = resolve(config, DEFAULTS)
    if not cfg["skip_prk_steps"]:
        raise ValueError("PNDM with skip_prk_steps=False (Runge-Kutta warm-up) is not supported")
    ac = alphas_cumprod(cfg).astype(np.float64)
    final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    ts = spaced_timesteps(cfg, steps)
    if cfg["timestep_spacing"] == "linspace":
        ts = ts.round()
    ts = ts.astype(np.int64)  # descending
    ts = np.concatenate([ts[:1], ts[1:2], ts[1:]]) if steps > 1 else ts  # 2nd call repeated
    ratio = int(cfg["num_train_timesteps"]) // steps
    t, prev = ts + 0, ts - ratio
    if steps > 1:  # call 1 redoes step t0 -> t1 from the first sample (scheduling_pndm.py)
        t[1], prev[1] = ts[1] + ratio, ts[1]
    a_t = ac[t]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    # PNDM eq. 9: x_prev = sqrt(a'/a) x - (a' - a) eps / (a sqrt(b') + sqrt(a b a'))
    sample_coeff = np.sqrt(a_prev / a_t)
    output_coeff = -(a_prev - a_t) / (a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev))
    if cfg["prediction_type"] == "v_prediction":  # eps = sqrt(a) v + sqrt(b) x
        sample_coeff = sample_coeff + output_coeff * np.sqrt(b_t)
        output_coeff = output_coeff * np.sqrt(a_t)
    elif cfg["prediction_type"] != "epsilon":
        raise ValueError("PNDM supports prediction_type epsilon or v_prediction")
    timesteps, sc, oc = frozen(ts.astype(F32), sample_coeff.astype(F32), output_coeff.astype(F32))
    return PNDMSchedule(name, timesteps, 1.0, sc, oc)

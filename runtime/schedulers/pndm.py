"""PNDM: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
eq. 9 (transfer), 12 (linear multistep, PLMS) and 13 (Runge-Kutta warm-up, PRK);
diffusers schedulers/scheduling_pndm.py.

With skip_prk_steps (every SD v1.x config) N steps make N + 1 UNet calls for N >= 2:
the second timestep is repeated, and that call's output is averaged with the first (a
2nd-order warm-up on the first sample). Without it, 12 Runge-Kutta calls over the first
3 steps come first (N >= 4), then N - 3 PLMS calls.

A run that starts part-way (img2img) counts its calls from there, as diffusers'
`counter` does: its first call stores the sample, its second redoes the step into its
own timestep from that sample (the warm-up above), wherever they fall in the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.schedulers._tables import alphas_cumprod, ddpm_noise_scales, frozen, resolve, spaced_timesteps
from runtime.schedulers.base import F32, Schedule, State, linear_step

DEFAULTS = {"skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}

# Adams-Bashforth weights over the stored outputs, newest first (PNDM eq. 12)
_AB_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
               4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDMState(State):
    """Per-run history: past model outputs (a ring of 4 copies), the warm-up sample and
    the Runge-Kutta running sum."""

    def __init__(self, shape: tuple[int, ...], start: int):
        super().__init__(shape, scratch=2, start=start)  # eps, and the final update's scratch
        self.ets = [np.empty(self.shape, F32) for _ in range(4)]
        self.count = 0  # outputs stored so far; the newest is ets[(count - 1) % 4]
        self.cur_sample = np.empty(self.shape, F32)
        self.rk_sum = np.empty(self.shape, F32)

    def push(self, model_output: np.ndarray) -> None:
        slot = self.ets[self.count % 4]
        if model_output is not slot:  # written there already (output_buffer), else copied:
            np.copyto(slot, model_output)  # the caller may reuse its buffer
        self.count += 1

    def newest(self, k: int = 0) -> np.ndarray:
        return self.ets[(self.count - 1 - k) % 4]


@dataclass(frozen=True)
class PNDMSchedule(Schedule):
    sample_coeff: np.ndarray  # [calls] float32: prev = sample_coeff * x + output_coeff * eps
    output_coeff: np.ndarray  # [calls] float32: PRK stage, or PLMS t_i -> t_i - ratio
    warm_sample_coeff: np.ndarray  # [calls] float32: the run's 2nd call, t_i + ratio -> t_i
    warm_output_coeff: np.ndarray  # [calls] float32
    rk_stage: np.ndarray  # [calls] int: Runge-Kutta stage 0..3 of a PRK call, -1 for PLMS

    def start_index(self, strength: float) -> int:
        start = super().start_index(strength)
        if 0 < start < len(self.timesteps) and self.rk_stage[0] >= 0:
            raise ValueError("PNDM with skip_prk_steps=False can't start part-way; use "
                             "strength 1 or another scheduler")
        return start

    def _state(self, shape: tuple[int, ...], rng: Any, start: int) -> PNDMState:
        if start and self.rk_stage[0] >= 0:  # diffusers' step_prk reads its own timesteps
            # by counter whatever the start: a mix of two places in the schedule, not copied
            raise ValueError("PNDM with skip_prk_steps=False can't start part-way (img2img)")
        return PNDMState(shape, start)

    def output_buffer(self, state: PNDMState, i: int) -> np.ndarray | None:
        # the calls that push: the first RK stage, and every PLMS call but a run's 2nd
        pushes = self.rk_stage[i] == 0 or (self.rk_stage[i] < 0 and i - state.start != 1)
        return state.ets[state.count % 4] if pushes else None

    def step(self, state: PNDMState, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng: Any, out: np.ndarray) -> np.ndarray:
        eps, tmp = state.tmp  # [B, 4, h, w]
        stage, counter = self.rk_stage[i], i - state.start  # counter: diffusers' self.counter
        sample_coeff, output_coeff = self.sample_coeff[i], self.output_coeff[i]
        if stage >= 0:  # RK4 weights 1/6, 1/3, 1/3, 1/6 (PNDM eq. 13)
            if stage == 0:
                state.push(model_output)
                np.copyto(state.cur_sample, sample)
                np.multiply(model_output, F32(1 / 6), out=state.rk_sum)
            elif stage < 3:
                np.multiply(model_output, F32(1 / 3), out=tmp)
                state.rk_sum += tmp
            if stage == 3:
                np.multiply(model_output, F32(1 / 6), out=eps)
                np.add(state.rk_sum, eps, out=eps)
            else:
                np.copyto(eps, model_output)
            sample = state.cur_sample
        elif counter == 1:  # repeated timestep: average, restart from the run's first sample
            np.add(model_output, state.newest(), out=eps)
            eps *= F32(0.5)
            sample = state.cur_sample
            sample_coeff, output_coeff = self.warm_sample_coeff[i], self.warm_output_coeff[i]
        else:
            state.push(model_output)
            if counter == 0:
                np.copyto(state.cur_sample, sample)
            weights = _AB_WEIGHTS[min(state.count, 4)]
            np.multiply(state.newest(), F32(weights[0]), out=eps)
            for k, w in enumerate(weights[1:], 1):
                np.multiply(state.newest(k), F32(w), out=tmp)
                eps += tmp
        return linear_step(sample_coeff, output_coeff, eps, sample, tmp, out)


def _coefficients(ac: np.ndarray, t: np.ndarray, prev: np.ndarray, final: float,
                  prediction_type: str) -> tuple[np.ndarray, np.ndarray]:
    """[calls] float64 (sample_coeff, output_coeff) of the steps t -> prev
    (scheduling_pndm.py _get_prev_sample; a negative prev is the final alpha)."""
    a_t = ac[t]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    # PNDM eq. 9: x_prev = sqrt(a'/a) x - (a' - a) eps / (a sqrt(b') + sqrt(a b a'))
    sample_coeff = np.sqrt(a_prev / a_t)
    output_coeff = -(a_prev - a_t) / (a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev))
    if prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(b) x
        return sample_coeff + output_coeff * np.sqrt(b_t), output_coeff * np.sqrt(a_t)
    if prediction_type != "epsilon":
        raise ValueError("PNDM supports prediction_type epsilon or v_prediction")
    return sample_coeff, output_coeff


def make(name: str, config: dict, steps: int) -> PNDMSchedule:
    cfg = resolve(config, DEFAULTS)
    if not cfg["skip_prk_steps"] and steps < 4:
        raise ValueError("PNDM without skip_prk_steps needs steps >= 4 (its Runge-Kutta warm-up)")
    ac = alphas_cumprod(cfg).astype(np.float64)
    final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    ts = spaced_timesteps(cfg, steps)
    if cfg["timestep_spacing"] == "linspace":
        ts = ts.round()
    ts = ts.astype(np.int64)  # descending
    n, ratio = int(cfg["num_train_timesteps"]), int(cfg["num_train_timesteps"]) // steps
    if cfg["skip_prk_steps"]:
        ts = np.concatenate([ts[:1], ts[1:2], ts[1:]]) if steps > 1 else ts  # 2nd call repeated
        t, prev, stage = ts, ts - ratio, np.full(len(ts), -1)
    else:  # 3 RK steps at half spacing (set_timesteps / step_prk in scheduling_pndm.py)
        half = np.tile([0, ratio // 2], 4) + ts[3::-1].repeat(2)  # [8] ascending
        rk = half[:-1].repeat(2)[1:-1][::-1]  # [12]
        c = np.arange(12)
        t = np.concatenate([rk[c // 4 * 4], ts[3:]])
        prev = np.concatenate([rk - np.where(c % 2, 0, ratio // 2), ts[3:] - ratio])
        stage = np.concatenate([c % 4, np.full(steps - 3, -1)])
        ts = np.concatenate([rk, ts[3:]])
    kind = cfg["prediction_type"]
    # a run's 2nd call redoes the step into its own timestep: t_i + ratio -> t_i (step_plms
    # at counter 1); clipped at the top call, which is never a run's 2nd
    warm_t = np.minimum(ts + ratio, n - 1)
    coeffs = (*_coefficients(ac, t, prev, final, kind), *_coefficients(ac, warm_t, ts, final, kind))
    return PNDMSchedule(name, frozen(ts.astype(F32))[0], 1.0, steps, *frozen(
        *ddpm_noise_scales(ac, ts), *(a.astype(F32) for a in coeffs), stage))

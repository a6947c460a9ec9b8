"""What every numpy scheduler shares: frozen tables, per-run buffers, the step contract.

    state = sched.new_state(shape, rng)           # buffers for [B, 4, h, w], allocated once
    x = sched.scale_model_input(latents, i, out)  # writes `out` (or returns latents as is)
    latents = sched.step(state, i, eps, latents, rng, out=latents)  # writes `out`

img2img and inpainting start part-way (diffusers' get_timesteps + set_begin_index):

    start = sched.start_index(strength)           # len(timesteps): nothing to run, refuse
    x = sched.add_noise(image_latents, noise, start, out=latents)
    state = sched.new_state(shape, rng, start)    # then calls i = start .. calls - 1

`step` writes x_{i+1} into `out` and returns it; `out` may be `sample` itself (an
in-place update) but never `model_output`, which it only reads: it keeps no reference
to it, so the caller may reuse that buffer. Every product and sum is taken in the same
order as before `out=` existed, so results are bit-identical to that version.
Nothing here allocates per step: the state owns the scratch arrays and histories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from runtime.schedulers._tables import frozen

F32 = np.float32
_Sigma = TypeVar("_Sigma", bound="SigmaSchedule")


class State:
    """Per-run buffers of one [B, 4, h, w] float32 shape: `tmp` scratch arrays, and what a
    multistep scheduler keeps (subclasses)."""

    def __init__(self, shape: tuple[int, ...], scratch: int = 1, start: int = 0):
        self.shape = tuple(shape)
        self.start = start  # the run's first call (diffusers' begin_index)
        self.tmp = [np.empty(self.shape, F32) for _ in range(scratch)]


@dataclass(frozen=True)
class Schedule:
    """The frozen tables of one scheduler for one step count."""

    name: str
    timesteps: np.ndarray  # [calls] float32: the UNet's timestep at call i
    init_noise_sigma: float
    steps: int  # num_inference_steps; calls = steps + 1 for PNDM with skip_prk_steps
    signal_scale: np.ndarray  # [calls] float32: add_noise(x, n, i) = signal_scale[i] x
    noise_scale: np.ndarray  # [calls] float32:                      + noise_scale[i] n
    order: ClassVar[int] = 1  # diffusers' scheduler.order: 1 for all seven classes
    scales_input: ClassVar[bool] = False  # scale_model_input writes `out` (else returns sample)

    def start_index(self, strength: float) -> int:
        """The first call of an img2img / inpainting run that keeps `strength` of the
        schedule, as diffusers' get_timesteps (pipeline_stable_diffusion_img2img.py).
        Returns len(timesteps) where diffusers refuses (int(steps * strength) == 0: no
        denoising step left; PNDM would still have one call there): the caller refuses."""
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        init_timestep = min(int(self.steps * strength), self.steps)
        if init_timestep < 1:
            return len(self.timesteps)
        return (self.steps - init_timestep) * self.order

    def new_state(self, shape: tuple[int, ...], rng: Any = None, start: int = 0) -> State:
        """Buffers for one run at latent `shape` that begins at call `start` (diffusers'
        set_begin_index(start)); `step` still takes absolute call indices. Called after
        the initial latents are drawn: Euler ancestral continues `rng` from there."""
        calls = len(self.timesteps)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start < calls:
            raise ValueError(f"{self.name}: start must be an integer in [0, {calls}), got {start!r}")
        return self._state(tuple(shape), rng, int(start))

    def _state(self, shape: tuple[int, ...], rng: Any, start: int) -> State:
        return State(shape, start=start)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int, out: np.ndarray,
                  scratch: np.ndarray | None = None) -> np.ndarray:
        """diffusers' add_noise(original, noise, timesteps[i]) with the begin index set:
        img2img's initial latents (i = start) and inpainting's re-noised image after each
        step (i = the next call). float32 products, then their sum, as torch does.
        `out` may be `original` or `noise`; `scratch`, a [B, 4, h, w] float32 buffer,
        saves the one array this allocates otherwise."""
        tmp = np.multiply(noise, self.noise_scale[i], out=scratch)  # [B, 4, h, w]
        np.multiply(original, self.signal_scale[i], out=out)
        out += tmp
        return out

    def scale_model_input(self, sample: np.ndarray, i: int, out: np.ndarray) -> np.ndarray:
        """The UNet's input at call i, written into `out`, or `sample` itself when the
        scheduler does not scale it (PNDM, DDIM, DPM++)."""
        return sample

    def output_buffer(self, state: Any, i: int) -> np.ndarray | None:
        """Where the caller may write call i's model output [B, 4, h, w] so that `step`
        keeps it without a copy (PNDM: the history slot it would copy into), or None.
        The buffer is the state's: the caller writes it only just before step(i)."""
        return None

    def step(self, state: Any, i: int, model_output: np.ndarray, sample: np.ndarray,
             rng: Any, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class SigmaSchedule(Schedule):
    """k-diffusion style samplers (Euler, Euler ancestral, LMS): the UNet sees
    x / sqrt(sigma^2 + 1) (Karras et al. 2022, table 1, c_in)."""

    sigmas: np.ndarray  # [calls + 1] float32
    input_scale: np.ndarray  # [calls] float32: 1 / sqrt(sigma^2 + 1)
    scales_input: ClassVar[bool] = True

    @classmethod
    def build(cls: type[_Sigma], name: str, steps: int, ts: np.ndarray, sigmas: np.ndarray,
              init_noise_sigma: float, *tables: np.ndarray) -> _Sigma:
        """The schedule from discrete_sigmas' (ts, sigmas, init) and the subclass's own
        [calls] tables (float64, stored as float32). add_noise is x + sigma n
        (scheduling_euler_discrete.py add_noise: sigma at the begin or step index)."""
        sigma = sigmas[:-1].astype(np.float64)
        own = [a.astype(F32) for a in (1 / np.sqrt(sigma**2 + 1), *tables)]
        return cls(name, frozen(ts)[0], init_noise_sigma, steps,
                   *frozen(np.ones(len(ts), F32), sigmas[:-1], sigmas, *own))

    def scale_model_input(self, sample: np.ndarray, i: int, out: np.ndarray) -> np.ndarray:
        return np.multiply(sample, self.input_scale[i], out=out)


def linear_step(sample_coeff: np.floating, output_coeff: np.floating, model_output: np.ndarray,
                sample: np.ndarray, tmp: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = output_coeff * model_output + sample_coeff * sample (the one-step update of
    Euler, DDIM without clipping and PNDM's transfer), through one scratch array."""
    np.multiply(model_output, output_coeff, out=tmp)
    np.multiply(sample, sample_coeff, out=out)
    out += tmp
    return out

"""numpy schedulers that reproduce diffusers' step for step, torch-free.

``make_schedule(name, config, steps)`` reads the bundle's ``scheduler_config.json`` the
way ``XScheduler.from_config(config)`` does (keys a class does not know are ignored;
missing keys take that class's defaults) and returns a frozen ``Schedule``
(runtime/schedulers/base.py); per-run buffers live in the state it makes:

    sched = make_schedule("pndm", config, 50)
    x = rng.randn(shape) * sched.init_noise_sigma   # [B, 4, h, w] float32
    state = sched.new_state(x.shape, rng)          # after the initial draw
    for i, t in enumerate(sched.timesteps):       # PNDM: steps + 1 calls
        eps = unet(sched.scale_model_input(x, i, out=unet_input), t)
        x = sched.step(state, i, eps, x, rng, out=x)   # in place; allocates nothing

img2img and inpainting start part-way: ``start = sched.start_index(strength)``,
``sched.add_noise(image_latents, noise, start, out)``, ``sched.new_state(shape, rng,
start)``, then calls ``start .. calls - 1`` (runtime/schedulers/base.py).

``step`` writes into ``out`` (which may be ``sample``), never keeps a reference to
``model_output`` (the caller may reuse that buffer) and never writes into it.
``scale_model_input`` may return ``sample`` itself (PNDM, DDIM, DPM++).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from runtime.schedulers import ddim, dpmpp, euler, euler_ancestral, lms, pndm
from runtime.schedulers.base import Schedule, State

__all__ = ["SCHEDULERS", "Schedule", "State", "make_schedule"]


# name -> (diffusers class it reproduces, maker, config overrides)
_MAKERS: dict[str, tuple[str, Callable[..., Schedule], dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", pndm.make, {}),
    "ddim": ("DDIMScheduler", ddim.make, {}),
    "euler": ("EulerDiscreteScheduler", euler.make, {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", euler_ancestral.make, {}),
    "lms": ("LMSDiscreteScheduler", lms.make, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dpmpp.make, {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dpmpp.make, {"use_karras_sigmas": True}),
}
SCHEDULERS: tuple[str, ...] = tuple(_MAKERS)
DIFFUSERS_CLASS: Mapping[str, str] = {k: v[0] for k, v in _MAKERS.items()}
CONFIG_OVERRIDES: Mapping[str, Mapping[str, Any]] = {k: v[2] for k, v in _MAKERS.items()}


def make_schedule(name: str, config: Mapping[str, Any], steps: int) -> Schedule:
    """The frozen tables for ``steps`` denoising steps of scheduler ``name``."""
    if name not in _MAKERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _, maker, overrides = _MAKERS[name]
    return maker(name, {**config, **overrides}, int(steps))

"""A training stage's checkpoint (`vae.pt`, `denoiser.pt`): its modules, the optimizer,
torch's and the stage's own random generator, the step, and the run it belongs to
(seed, dataset, batch, ...). Resuming restores all of it, so an interrupted run ends
where an uninterrupted one would; a resume with other run settings is refused in one
line instead of silently mixing two runs.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from runtime.files import write_atomic


class TrainingError(ValueError):
    """A user error in a training run: one line, exit 2."""


def resume(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
           gen: torch.Generator, run: dict, steps: int) -> int:
    """The step `path` was saved at (0 when there is none), everything restored."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("run") != run:
        raise TrainingError(f"{path} belongs to another run ({state.get('run')}, this one "
                            f"{run}): use another --out, or the same settings")
    if state["step"] > steps:
        raise TrainingError(f"{path} is at step {state['step']}, past the {steps} asked for: "
                            f"ask for at least {state['step']}")
    for name, m in modules.items():
        m.load_state_dict(state[name])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    gen.set_state(state["gen"])
    return int(state["step"])


def save(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
         gen: torch.Generator, step: int, run: dict) -> None:
    buf = io.BytesIO()  # a few MB: written whole, or not at all (write_atomic)
    torch.save({**{n: m.state_dict() for n, m in modules.items()}, "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), "gen": gen.get_state(), "step": step, "run": run},
               buf)
    write_atomic(path, buf.getvalue())  # a run killed mid-save keeps the last checkpoint

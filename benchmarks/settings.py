"""One benchmark's settings: parsed by run.py, handed to each worker as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    model: str = "demo"  # demo | sd14-random (-> /tmp/sd14-random) | bundle folder
    backend: str = "ort-cpu"
    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = ""
    steps: int = 50
    scheduler: str = "pndm"
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    batch_size: int = 1
    seed: int = 0
    warmup: int = 1
    runs: int = 3
    throughput_batches: tuple[int, ...] = (1, 2, 4)
    throughput_warmup: int = 1
    throughput_runs: int = 1
    safety: bool = True
    alloc_probe: bool = True
    cuda_graph: bool = True  # ours: the UNet replayed as a CUDA graph (tensorrt, ort-cuda)
    precision: str = "auto"  # ours: auto | fp32 | bf16 | fp16 (runtime.backends.resolve_precision)
    # the diffusers baseline
    baseline_device: str = "cpu"
    baseline_dtype: str = "float32"
    compile: bool = False  # torch.compile the baseline's UNet (GPU option; untested here)

    def call_kwargs(self, batch: int | None = None) -> dict:
        """The generation parameters both sides get."""
        return {"steps": self.steps, "scheduler": self.scheduler,
                "guidance_scale": self.guidance_scale, "height": self.height,
                "width": self.width, "batch_size": batch or self.batch_size, "seed": self.seed}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Settings:
        d = json.loads(text)
        d["throughput_batches"] = tuple(d["throughput_batches"])
        return Settings(**d)


def resolve(model: str) -> Path:
    """A bundle folder: `demo` (built in), `sd14-random` ($SDRT_SD14_RANDOM or
    /tmp/sd14-random, made by `python -m export --model sd14-random --out DIR`), or a path."""
    from runtime.bundle import resolve_model

    if model == "sd14-random" and not Path(model).is_dir():
        path = Path(os.environ.get("SDRT_SD14_RANDOM", "/tmp/sd14-random"))
        if not path.is_dir():
            raise SystemExit(f"error: no sd14-random bundle at {path}; make it with `python -m "
                             f"export --model sd14-random --out {path}` (or set SDRT_SD14_RANDOM)")
        return path
    return resolve_model(model)

"""`python -m benchmarks.spread BUNDLE`: how far diffusers' own picture moves when only
its precision changes (fp32 -> fp16 on a GPU, fp32 -> bf16 on a CPU), same weights,
seed and settings.

That is the yardstick for our reduced-precision closeness (DESIGN.md: reduced precision
is judged against the reference's own reduced precision): on random weights a 50-step
run can be chaotic, and then ours-fp16 vs diffusers-fp16 differing says nothing about
our graphs unless diffusers-fp16 vs diffusers-fp32 differs as much.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.spread", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", type=int, nargs="+", default=[50])
    ap.add_argument("--scheduler", default="pndm")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    import torch

    from benchmarks import baseline_diffusers as bd
    from benchmarks.settings import Settings
    from runtime.bundle import read_manifest

    low = "float16" if a.device == "cuda" else "bfloat16"
    manifest = read_manifest(a.bundle)
    pipe, where = bd.load_pipeline(a.bundle, manifest, a.scheduler, a.device, "float32",
                                   safety=False, compile_unet=False)
    s = Settings()
    result: dict = {"bundle": str(a.bundle), "device": a.device, "low": low, "weights": where,
                    "scheduler": a.scheduler, "seed": a.seed, "by_steps": {}}
    images: dict[tuple[str, int], np.ndarray] = {}
    inst = bd.Instrumented(pipe, a.device)  # hooks stay on the modules across .to()
    for dtype in ("float32", low):
        pipe.to(a.device, getattr(torch, dtype))
        for steps in a.steps:
            kw = {"steps": steps, "guidance_scale": s.guidance_scale, "height": s.height,
                  "width": s.width, "batch_size": 1, "seed": a.seed}
            images[dtype, steps] = inst.generate(s.prompt, "", kw)["images"].astype(np.int16)
            print(f"spread: {dtype}, {steps} steps done", file=sys.stderr, flush=True)
    for steps in a.steps:
        d = np.abs(images["float32", steps] - images[low, steps])
        result["by_steps"][str(steps)] = {"max_abs": int(d.max()), "mean_abs": float(d.mean())}
        print(f"diffusers float32 vs {low}, {steps} steps: max {d.max()}, mean {d.mean():.3f} (of 255)")
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

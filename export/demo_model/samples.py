"""A grid of the demo's pictures for the README: each prompt with the defaults (PNDM,
50 steps, guidance 7.5), then the same seed without guidance (1) below it.

    python -m export.demo_model.samples --out export/demo_model/samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = ("a red star on a blue background", "a blue triangle on a yellow background",
           "a yellow circle on a black background", "a green square on a white background",
           "a purple star on a orange background", "a white circle on a red background")


def grid(model: str = "demo", scale: int = 3) -> Image.Image:
    from runtime.pipeline import Pipeline

    rows = []
    with Pipeline(model, "ort-cpu", safety=False) as pipe:
        for guidance in (7.5, 1.0):
            row = [pipe(p, guidance_scale=guidance, seed=k).images[0]
                   for k, p in enumerate(PROMPTS)]
            rows.append(np.concatenate(row, axis=1))
    image = Image.fromarray(np.concatenate(rows, axis=0))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.demo_model.samples",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="demo")
    a = p.parse_args(argv)
    grid(a.model).save(a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

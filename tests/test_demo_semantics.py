"""Issue 16's tools: captioned shapes, the pixel-statistics judge, the training script,
and the semantic check of a trained model.

The semantic check: for 24 prompts, 4 shapes x 6 colours (the pairs held out of training
among them), the picture's foreground colour must match the prompt in >= 90% and its
shape in >= 75% (export/demo_model/shapes.py judge). It runs on a bundle made by
`python -m export.demo_model.train` when SDRT_DEMO_SHAPES names it (the trained weights
are not shipped yet: README, "The demo model"). Measured on the bundle trained here
(2-core AMD EPYC, 20 PNDM steps): colour + shape hits of 48 were 48 at guidance 1 and 2,
33 at 3, 11 at 5 and 13 at 7.5.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from export.demo_model.shapes import COLOURS, SHAPES, caption, draw, judge, random_scene
from export.demo_model.train import HELD_OUT

TEST_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
GUIDANCE = 2.0  # the trained model's pictures fall apart above 2 (see above)


def prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape): each pair once, on a background of another colour."""
    names, out = list(COLOURS), []
    for i, colour in enumerate(TEST_COLOURS):
        for j, shape in enumerate(SHAPES):
            others = [c for c in names if c != colour]
            out.append((caption(shape, colour, others[(3 * i + j) % len(others)]), colour, shape))
    return out


def score(pipe, guidance: float) -> tuple[int, int, list[str]]:
    """(colour hits, shape hits, what was missed) over prompts()."""
    colours = shapes = 0
    misses = []
    for k, (prompt, colour, shape) in enumerate(prompts()):
        v = judge(pipe(prompt, steps=20, guidance_scale=guidance, seed=k).images[0])
        colours += v.colour == colour
        shapes += v.shape == shape
        if (v.colour, v.shape) != (colour, shape):
            misses.append(f"{prompt!r}: {v.colour} {v.shape} (fill {v.fill:.2f})")
    return colours, shapes, misses


def test_the_grid_covers_the_held_out_pairs():
    asked = {(c, s) for _, c, s in prompts()}
    assert len(prompts()) == 24 and HELD_OUT <= asked


def test_the_judge_reads_drawn_pictures():
    """The judge on pictures drawn from scenes: every colour and shape right; a plain
    picture has no foreground."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = random_scene(rng)
        v = judge(draw(scene))
        assert (v.colour, v.shape) == (scene.colour, scene.shape), (scene, v)
    assert judge(np.full((64, 64, 3), 30, np.uint8)).shape == "none"


def test_training_runs_resumes_and_exports(tmp_path):
    """A few steps of each stage on a small dataset: checkpoints, a second run that goes
    on from them, fp16 weights with unused token rows zeroed, and a bundle that runs."""
    import torch
    from safetensors.torch import load_file

    from export.demo_model.train import main, token_ids
    from runtime.pipeline import Pipeline

    args = ["--out", str(tmp_path), "--dataset", "64", "--vae-steps", "2", "--vae-batch", "4",
            "--batch", "8", "--save-every", "2"]
    assert main([*args, "--steps", "2"]) == 0
    assert torch.load(tmp_path / "denoiser.pt", weights_only=True)["step"] == 2
    assert main([*args, "--steps", "4"]) == 0
    assert torch.load(tmp_path / "denoiser.pt", weights_only=True)["step"] == 4
    state = load_file(str(tmp_path / "weights.safetensors"))
    (table,) = [v for k, v in state.items() if k.endswith("embeddings.token_embedding.weight")]
    assert table.dtype == torch.float16
    used = token_ids(["a red circle on a blue background"]).unique()
    rows = table.abs().sum(1) != 0  # kept: the captions' words, BOS and EOS
    assert rows.sum() < 100 and rows[used].all()
    with Pipeline(tmp_path / "bundle", "ort-cpu", safety=False) as pipe:
        assert pipe("a red circle on a blue background", steps=2).images.shape == (1, 64, 64, 3)


@pytest.mark.skipif(not os.environ.get("SDRT_DEMO_SHAPES"),
                    reason="set SDRT_DEMO_SHAPES to a bundle made by export.demo_model.train")
def test_the_trained_model_draws_the_colour_and_shape_it_is_told():
    from runtime.pipeline import Pipeline

    with Pipeline(Path(os.environ["SDRT_DEMO_SHAPES"]), "ort-cpu", safety=False) as pipe:
        colours, shapes, misses = score(pipe, GUIDANCE)
    print(f"\ncolour {colours}/24, shape {shapes}/24 at guidance {GUIDANCE}; misses: {misses}")
    assert colours >= 22, misses  # >= 90% of 24
    assert shapes >= 18, misses  # >= 75%

"""The shipped demo draws what it is told (issue 16): its tools (captioned shapes, the
pixel-statistics judge, the training script) and the semantic check of the shipped model.

The semantic check: for 24 prompts, 4 shapes x 6 colours (the pairs held out of training
among them), with the CLI's defaults (PNDM, 50 steps, guidance 7.5), the picture's
foreground colour must match the prompt in >= 90% and its shape in >= 75% (judged by
export/demo_model/shapes.py's judge, no learned judge); without guidance (1) the score
must be lower: classifier-free guidance does something.
"""

from __future__ import annotations

import numpy as np
import pytest

from export.demo_model.shapes import COLOURS, HELD_OUT, SHAPES, caption, draw, judge, random_scene

TEST_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
DEFAULT_GUIDANCE = 7.5  # runtime.generate's, with its PNDM and 50 steps


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
        v = judge(pipe(prompt, guidance_scale=guidance, seed=k).images[0])  # PNDM, 50 steps
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
    on from them, fp16 weights with the token table cut to the captions' rows, and a
    bundle that runs."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from export.demo_model import weights
    from export.demo_model.train import load_weights, main, token_ids
    from runtime.pipeline import Pipeline

    args = ["--out", str(tmp_path), *TINY_RUN]
    assert main([*args, "--steps", "2"]) == 0
    assert torch.load(tmp_path / "denoiser.pt", weights_only=True)["step"] == 2
    assert main([*args, "--steps", "4"]) == 0
    assert torch.load(tmp_path / "denoiser.pt", weights_only=True)["step"] == 4
    state = load_file(str(tmp_path / "weights.safetensors"))
    ids, rows = state[weights.TABLE_IDS], state[weights.TABLE_ROWS]
    assert not [k for k in state if "token_embedding" in k] and rows.dtype == torch.float16
    assert rows.shape == (len(ids), 32) and len(ids) < 100  # the captions' words, BOS, EOS
    assert set(token_ids(["a red circle on a blue background"]).unique().tolist()) <= set(ids.tolist())
    text, _, _ = load_weights(tmp_path / "weights.safetensors")
    table = text.get_input_embeddings().weight
    assert torch.equal(table[ids], rows.float()) and table.abs().sum() == rows.float().abs().sum()
    with Pipeline(tmp_path / "bundle", "ort-cpu", safety=False) as pipe:
        assert pipe("a red circle on a blue background", steps=2).images.shape == (1, 64, 64, 3)
    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as f:
        made_by = f.metadata()
    assert (made_by["steps"], made_by["batch"], made_by["seed"]) == ("4", "8", "0")


TINY_RUN = ["--dataset", "64", "--vae-steps", "2", "--vae-batch", "4", "--batch", "8",
            "--save-every", "2"]


def test_an_interrupted_run_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    """Killed right after its step-2 checkpoint and run again, training gives the very
    weights of a run that was never stopped: the checkpoint keeps the batch generator."""
    from safetensors.torch import load_file

    from export.demo_model import train

    assert train.main(["--out", str(tmp_path / "once"), *TINY_RUN, "--steps", "4"]) == 0
    keep = train.save_weights

    def killed(path, *args):
        if path.name == "weights-2.safetensors":
            raise KeyboardInterrupt
        keep(path, *args)

    monkeypatch.setattr(train, "save_weights", killed)
    again = ["--out", str(tmp_path / "twice"), *TINY_RUN, "--steps", "4", "--snapshot-every", "2"]
    with pytest.raises(KeyboardInterrupt):
        train.main(again)
    monkeypatch.setattr(train, "save_weights", keep)
    assert train.main(again) == 0
    once, twice = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("once", "twice"))
    assert once.keys() == twice.keys()
    assert all((once[k] == twice[k]).all() for k in once)


@pytest.mark.parametrize("change, message", [
    (["--batch", "4"], "belongs to another run"),
    (["--steps", "1"], "is at step 2, past the 1 asked for"),
    (["--snapshot-every", "3"], "--snapshot-every must be 0 or a multiple of --save-every"),
    (["--save-every", "0"], "--save-every must be at least 1"),
])
def test_training_refuses_settings_in_one_line(tmp_path, capsys, change, message):
    """A resume with another run's settings or impossible numbers: exit 2, one line."""
    from export.demo_model.train import main

    args = ["--out", str(tmp_path), *TINY_RUN]
    assert main([*args, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--steps", "2", *change]) == 2
    err = capsys.readouterr().err  # tqdm's progress, then the error
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err


def test_a_bad_demo_weights_file_is_one_line(tmp_path):
    """Missing, not safetensors (a git-lfs pointer), or of another config: ExportError
    (the export CLI's one line and exit 2), never a traceback."""
    import dataclasses

    from export.components import build_components
    from export.configs import DEMO
    from export.errors import ExportError

    (tmp_path / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    narrow = {**DEMO.text_encoder, "hidden_size": 16, "projection_dim": 16}
    for cfg, message in [
        (dataclasses.replace(DEMO, weights=str(tmp_path / "none.safetensors")), "cannot read"),
        (dataclasses.replace(DEMO, weights=str(tmp_path / "lfs.safetensors")), "cannot read"),
        (dataclasses.replace(DEMO, text_encoder=narrow), "does not fit the demo's config"),
    ]:
        with pytest.raises(ExportError, match=message) as e:
            build_components(cfg, safety=False)
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module", params=["ort-cpu", "openvino"])
def demo_scores(request) -> dict[float, tuple[int, int, list[str]]]:
    """score() of the shipped demo at the default guidance and without guidance, on each
    CPU backend in its default precision (openvino: bf16 where the CPU has it, what
    `auto` picks once openvino is installed)."""
    from runtime.pipeline import Pipeline

    if request.param == "openvino":
        pytest.importorskip("openvino")
    with Pipeline("demo", request.param, safety=False) as pipe:
        return {g: score(pipe, g) for g in (DEFAULT_GUIDANCE, 1.0)}


def test_the_demo_draws_the_colour_and_shape_it_is_told(demo_scores):
    colours, shapes, misses = demo_scores[DEFAULT_GUIDANCE]
    print(f"\ncolour {colours}/24, shape {shapes}/24 at guidance {DEFAULT_GUIDANCE}; misses: {misses}")
    assert colours >= 22, misses  # >= 90% of 24
    assert shapes >= 18, misses  # >= 75%


def test_guidance_makes_the_demo_follow_the_prompt_better(demo_scores):
    """Without classifier-free guidance fewer colours and shapes are right (measured on
    the shipped weights, ort-cpu: 39 of 48 against 45 at 7.5, all of it shape; openvino
    bf16: 39 against 44); CFG must add at least 3."""
    guided = sum(demo_scores[DEFAULT_GUIDANCE][:2])
    plain = sum(demo_scores[1.0][:2])
    print(f"\ncolour + shape hits of 48: {plain} without guidance, {guided} at {DEFAULT_GUIDANCE}")
    assert plain + 3 <= guided, (plain, guided, demo_scores[1.0][2])

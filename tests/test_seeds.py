"""Per-image seeds (`seeds=[...]`, `--seeds`): image k of a batch is the image its seed
gives alone, bit for bit, whatever else is in the batch (what serving's batching needs)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.pipeline import Pipeline, UsageError
from runtime.rng import PerImageGenerators, TorchCPUGenerator


@pytest.fixture(scope="module")
def pipe():
    with Pipeline("demo", "ort-cpu", safety=False) as p:
        yield p


def test_per_image_draws_are_each_seeds_own_stream():
    gens = PerImageGenerators([3, 9])
    two = gens.randn((2, 4, 8, 8))
    again = gens.randn((5, 2, 4, 8, 8))  # Euler ancestral's draw-ahead: [draws, B, 4, h, w]
    for k, seed in enumerate([3, 9]):
        alone = TorchCPUGenerator(seed)
        assert np.array_equal(two[k], alone.randn((1, 4, 8, 8))[0])
        assert np.array_equal(again[:, k], alone.randn((5, 1, 4, 8, 8))[:, 0])
    with pytest.raises(ValueError, match="axis -4"):
        gens.randn((3, 4, 8, 8))


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a", "dpmpp_2m"])
def test_batched_images_equal_each_alone(pipe, scheduler):
    kw = dict(steps=4, height=64, width=64, scheduler=scheduler)
    prompts = ["a red circle", "a blue square", "a green star"]
    seeds = [11, 2**63 + 5, 11]  # a repeated seed with another prompt, and a huge one
    batched = pipe(prompts, negative_prompt=["", "blurry", ""], seeds=seeds, **kw)
    assert batched.request.seeds == tuple(seeds)
    for k, (prompt, neg, seed) in enumerate(zip(prompts, ["", "blurry", ""], seeds, strict=True)):
        alone = pipe(prompt, negative_prompt=neg, seed=seed, **kw).images[0]
        assert np.array_equal(batched.images[k], alone), f"image {k} ({scheduler})"
    # the same seeds as one batch generator would differ: they are per-image streams
    assert not np.array_equal(pipe(prompts, seed=11, **kw).images[1], batched.images[1])


def test_euler_ancestral_batch_at_sizes_whose_latents_are_not_16_aligned(pipe):
    """24x24: a [4, 3, 3] latent is 36 values, not a multiple of torch's 16-value blocks:
    alone, each step draws its own noise; batched, each image's generator must too."""
    kw = dict(steps=3, height=24, width=24, scheduler="euler_a")
    batched = pipe(["a"] * 4, seeds=[1, 2, 3, 4], **kw).images
    for k in range(4):
        assert np.array_equal(batched[k], pipe("a", seed=k + 1, **kw).images[0]), k


def test_batched_img2img_and_inpainting_equal_each_alone(pipe):
    rs = np.random.RandomState(0)
    image = Image.fromarray((rs.rand(64, 64, 3) * 255).astype(np.uint8))
    mask = Image.fromarray(((rs.rand(64, 64) > 0.5) * 255).astype(np.uint8))
    for extra in ({"strength": 0.7}, {"mask": mask, "strength": 0.9}):
        kw = dict(steps=5, scheduler="euler_a", image=image, height=64, width=64, **extra)
        batched = pipe(["a cat", "a dog"], seeds=[3, 4], **kw).images
        for k, (prompt, seed) in enumerate([("a cat", 3), ("a dog", 4)]):
            assert np.array_equal(batched[k], pipe(prompt, seed=seed, **kw).images[0]), extra


def test_seeds_are_checked(pipe):
    with pytest.raises(UsageError, match="2 seeds for 3 image"):
        pipe.request(["a", "b", "c"], seeds=[1, 2])
    with pytest.raises(UsageError, match="not both"):
        pipe.request("a", seeds=[1], seed=1)
    with pytest.raises(UsageError, match="integers in"):
        pipe.request("a", seeds=[True])


def test_cli_seeds_write_each_images_own_seed(tmp_path):
    from runtime.generate import main

    assert main(["a red circle", "--seeds", "5,6", "--steps", "2", "--height", "64", "--width",
                 "64", "--backend", "ort-cpu", "--output-dir", str(tmp_path / "b")]) == 0
    assert main(["a red circle", "--seed", "6", "--steps", "2", "--height", "64", "--width",
                 "64", "--backend", "ort-cpu", "--output-dir", str(tmp_path / "a")]) == 0
    second = Image.open(tmp_path / "b" / "a-red-circle-6-1.png")
    alone = Image.open(tmp_path / "a" / "a-red-circle-6.png")
    assert np.array_equal(np.asarray(second), np.asarray(alone))
    assert "Seed: 6," in second.text["parameters"] and "Batch pos" not in second.text["parameters"]
    assert second.text["seed"] == "6"

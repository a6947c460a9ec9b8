"""Pipeline behaviour beyond parity: NaN detection, validation, reuse, latents input."""

import numpy as np
import pytest

from runtime.pipeline import Pipeline, StageError, UsageError


@pytest.fixture(scope="module")
def pipe():
    with Pipeline("demo", "ort-cpu") as p:
        yield p


def test_nan_in_a_stage_names_the_stage(pipe, monkeypatch):
    unet = pipe.engines["unet"]
    real = unet.run

    def poisoned(feeds):
        out = real(feeds)
        out["noise_pred"][0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(unet, "run", poisoned)
    with pytest.raises(StageError, match=r"unet \(step 1 of 3, timestep 501\) produced NaN"):
        pipe("x", steps=2, seed=0)


def test_nan_later_in_the_loop_stops_it_within_8_steps(pipe, monkeypatch):
    unet = pipe.engines["unet"]
    real, calls = unet.run, []

    def poisoned(feeds):
        out = real(feeds)
        calls.append(1)
        if len(calls) == 3:
            out["noise_pred"][0, 0, 0, 0] = np.inf
        return out

    monkeypatch.setattr(unet, "run", poisoned)
    with pytest.raises(StageError, match=r"unet or scheduler \(steps 1 to 8 of 21\) "
                                         r"produced NaN or inf"):
        pipe("x", steps=20, seed=0)
    assert len(calls) == 8  # stopped there, not after 21 calls
    calls.clear()
    with pytest.raises(StageError, match=r"steps 1 to 4 of 4\)"):
        pipe("x", steps=3, seed=0)  # the last call is always checked


def test_same_seed_same_image_and_reuse(pipe):
    a = pipe("a red apple", steps=3, seed=42, height=64, width=64).images.copy()
    pipe("something else", steps=2, seed=1, batch_size=2)  # other shapes in between
    b = pipe("a red apple", steps=3, seed=42, height=64, width=64).images
    np.testing.assert_array_equal(a, b)


def test_given_latents_equal_seeded_latents(pipe):
    from runtime.rng import TorchCPUGenerator

    lat = TorchCPUGenerator(9).randn((1, 4, 8, 8))
    a = pipe("x", steps=2, seed=9, height=64, width=64).images.copy()
    b = pipe("x", steps=2, latents=lat, height=64, width=64).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=65), "65 images per call is more than 64"),
    (dict(height=72, width=522), r"width must be a multiple of 8 in \[8, 8192\]"),
    (dict(height=8200), "height must be a multiple of 8 in"),
    (dict(seed=-1), "seed must be"),
    (dict(guidance_scale=float("nan")), "guidance scale"),
    (dict(latents=np.full((1, 4, 8, 8), np.inf, np.float32)), "latents contain NaN or inf"),
])
def test_validation(pipe, kwargs, message):
    with pytest.raises(UsageError, match=message):
        pipe("x", steps=1, **kwargs)


def test_prompts_the_tokenizer_cannot_take_are_usage_errors(pipe):
    with pytest.raises(UsageError, match="not valid UTF-8"):
        pipe("caf\udce9", steps=1)  # how a latin-1 byte on a UTF-8 command line arrives
    with pytest.raises(UsageError, match="not valid UTF-8"):
        pipe("x", "bad \udcff negative", steps=1)

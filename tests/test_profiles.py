"""Shape profiles (issue 18): chosen at export, always containing the model's default
size, and a limit only where an artifact carries one (TensorRT plans)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime.bundle import Profile, demo_bundle, fit_profile, read_manifest
from runtime.pipeline import Pipeline, UsageError


def test_fit_profile_keeps_the_default_size_inside():
    assert fit_profile(512) == Profile((1, 1, 4), (256, 512, 1024), (256, 512, 1024))
    assert fit_profile(64) == Profile((1, 1, 4), (64, 64, 1024), (64, 64, 1024))  # widened
    assert fit_profile(64, 32, 128, 2) == Profile((1, 1, 2), (32, 64, 128), (32, 64, 128))
    assert fit_profile(2048).height == (256, 2048, 2048)
    assert fit_profile(512, None, 128 * 8).height == (256, 512, 1024)
    assert fit_profile(512, 2048 // 4).height == (512, 512, 1024)
    for args, message in [((64, 128), "--min-size 128 is above the model's default size 64x64"),
                          ((512, None, 256), "--max-size 256 is below the model's default size"),
                          ((512, 100), r"--min-size must be a multiple of 8 in \[8, 8192\]"),
                          ((512, None, 16384), "--max-size must be a multiple of 8 in"),
                          ((512, 512, 256), "--min-size 512 is larger than --max-size 256"),
                          ((512, None, None, 0), r"--max-batch must be an integer in \[1, 64\]"),
                          ((512, None, None, 65), "--max-batch must be"),
                          ((512, 256.0), "--min-size must be")]:
        with pytest.raises(ValueError, match=message):
            fit_profile(*args)


def test_the_text_encoder_profile_holds_prompt_and_negative_prompt():
    """With guidance the text encoder runs 2B texts in one call (the UNet 2B samples)."""
    from runtime.bundle import graph_spec

    rows = Profile((1, 1, 4)).shapes(graph_spec("text_encoder", 768))["input_ids"]
    assert rows == {"min": [1, 77], "opt": [2, 77], "max": [8, 77]}


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("flags, message, before_load", [
    (["--min-size", "100"], "--min-size must be a multiple of 8", True),
    (["--min-size", "512", "--max-size", "256"], "--min-size 512 is larger than --max-size 256",
     True),
    (["--max-batch", "0"], "--max-batch must be an integer in [1, 64]", True),
    (["--max-size", "99999"], "--max-size must be a multiple of 8 in [8, 8192]", True),
    (["--max-size", "56"], "--max-size 56 is below the model's default size 64x64", False),
])
def test_export_refuses_bad_profiles_in_one_line(tmp_path, flags, message, before_load):
    pytest.importorskip("torch")
    out = run("-m", "export", "--model", "demo", "--out", str(tmp_path / "b"), *flags)
    lines = out.stderr.splitlines()  # progress lines (loaded ...), then one error line
    assert out.returncode == 2 and sum(x.startswith("error") for x in lines) == 1, out.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], out.stderr
    assert (len(lines) == 1) == before_load, out.stderr  # flag errors before the model loads
    assert not (tmp_path / "b").exists()


def test_a_small_model_exports_with_a_custom_profile_and_its_defaults_run(tmp_path):
    """sample_size 8 (64 px): with bounds that hold it, and with none (the 256..1024
    default widened to it, so the model's own defaults never fail)."""
    pytest.importorskip("torch")
    import dataclasses

    from export.bundle_writer import export_bundle
    from export.components import build_components
    from export.errors import ExportError

    c = build_components("demo", seed=0)
    c.unet.register_to_config(sample_size=8)
    c = dataclasses.replace(c, model_id="small")  # not a known config: Profile()'s bounds
    custom = export_bundle(c, tmp_path / "custom", safety=False, min_size=32, max_size=96,
                           max_batch=2)
    m = read_manifest(custom)
    assert m.profile == Profile((1, 1, 2), (32, 64, 96), (32, 64, 96))
    assert (m.default_height, m.default_width) == (64, 64)
    plain = read_manifest(export_bundle(c, tmp_path / "plain", safety=False)).profile
    assert plain.height == plain.width == (64, 64, 1024)
    with pytest.raises(ExportError, match="--min-size 128 is above the model's default size 64x64"):
        export_bundle(c, tmp_path / "bad", safety=False, min_size=128)
    out = run("-m", "runtime.generate", "a red apple", "--model", str(custom), "--steps", "2",
              "--output-dir", str(tmp_path / "png"))  # no size given: the model's default
    assert out.returncode == 0, out.stderr
    from PIL import Image

    assert Image.open(out.stdout.split()[0]).size == (64, 64)


def test_cpu_backends_run_sizes_outside_the_profile():
    """Only TensorRT plans carry a profile: ort-cpu runs 40x48 (the demo's profile starts
    at 64) and a batch above its max (parity at such a size: test_pipeline_parity)."""
    with Pipeline("demo", "ort-cpu", safety=False) as pipe:
        assert pipe.manifest.profile.height[0] == 64 and pipe.manifest.profile.batch[2] == 4
        assert pipe("x", steps=1, height=40, width=48).images.shape == (1, 40, 48, 3)
        assert pipe("x", steps=1, height=64, width=64, batch_size=5).images.shape[0] == 5


def test_a_tensorrt_plan_refuses_a_size_outside_its_profile(tmp_path, monkeypatch):
    """Through the fakes: one line, before any work, naming the engines.build command
    that makes plans which cover it."""
    from fakes.gpu import FakeGPU
    from fakes.tiny_bundle import make_bundle

    from engines.build import main

    gpu = FakeGPU().install(monkeypatch)
    bundle = make_bundle(tmp_path / "bundle")  # profile 64..256 px, batch 1..2
    for extra in ("tokenizer", "scheduler_config.json"):  # what the pipeline reads besides
        src = demo_bundle() / extra
        (shutil.copytree if src.is_dir() else shutil.copy)(src, bundle / extra)
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    assert main([str(bundle), "--backend", "tensorrt"]) == 0
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        ok = pipe("x", steps=1, height=128, width=128, seed=0)
        assert ok.images.shape == (1, 128, 128, 3) and np.isfinite(ok.unet_calls).all()
        runs = len(gpu.calls("execute_async_v3"))
        with pytest.raises(UsageError) as err:
            pipe("x", steps=1, height=320, width=128)
        message = str(err.value)
        assert "\n" not in message and "320x128" in message and "no unet plan" in message
        assert (f"python -m engines.build {bundle} --backend tensorrt --min-size 64 "
                f"--max-size 320 --max-batch 2") in message
        assert len(gpu.calls("execute_async_v3")) == runs  # refused before any work
        # two prompts with guidance: 2 images, 4 texts in one text-encoder call, covered
        assert pipe(["a", "b"], steps=1, height=64, width=64).images.shape[0] == 2
        with pytest.raises(UsageError, match=r"3 image\(s\) per call, 77 text tokens: no .* "
                                             r"plan .*--max-batch 3"):
            pipe(["a", "b", "c"], steps=1, height=64, width=64)
        # the UNet's text axis is in the profile: 77..231 tokens (three prompt chunks)
        assert pipe("word " * 200, steps=1, height=64, width=64).request.text_tokens == 231
        with pytest.raises(UsageError, match=r"308 text tokens: no unet plan .*--max-tokens 308"):
            pipe("word " * 230, steps=1, height=64, width=64)
    assert main([str(bundle), "--backend", "tensorrt", "--max-size", "320", "--max-batch", "3",
                 "--max-tokens", "308"]) == 0
    with Pipeline(bundle, "tensorrt", safety=False) as pipe:
        assert pipe("x", steps=1, height=320, width=128).images.shape == (1, 320, 128, 3)
        assert pipe(["a", "b", "c"], steps=1, height=64, width=64).images.shape[0] == 3
        assert pipe("word " * 230, steps=1, height=64, width=64).request.text_tokens == 308

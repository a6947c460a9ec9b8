"""`python -m export` through a subprocess: every bad input exits 2 with one line on
stderr and writes nothing; a diffusers folder exports end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_export(*args, env=None):
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_refused(tmp_path, args, message, env=None):
    before = tree(tmp_path)
    out = run_export(*args, env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert out.stdout == ""
    assert tree(tmp_path) == before  # nothing written


def fake_diffusers_folder(root, weight_file):
    root.mkdir()
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for d in ("text_encoder", "unet", "vae", "scheduler", "tokenizer"):
        (root / d).mkdir()
    for d in ("text_encoder", "unet", "vae"):
        (root / d / weight_file).write_bytes(b"not really weights")
    for f in ("vocab.json", "merges.txt"):
        (root / "tokenizer" / f).write_text("{}")
    return root


def test_missing_folder(tmp_path):
    assert_refused(tmp_path, ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")],
                   "not found")


def test_not_a_diffusers_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path, ["--model", str(tmp_path / "empty"), "--out", str(tmp_path / "b")],
                   "no model_index.json")


def test_incomplete_diffusers_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")
    assert_refused(tmp_path, ["--model", str(tmp_path / "m"), "--out", str(tmp_path / "b")],
                   "missing text_encoder, unet, vae, scheduler, tokenizer")


def test_pickle_weights_in_a_folder_need_opt_in(tmp_path):
    model = fake_diffusers_folder(tmp_path / "m", "diffusion_pytorch_model.bin")
    assert_refused(tmp_path, ["--model", str(model), "--out", str(tmp_path / "b")], "--allow-pickle")


def test_folder_without_tokenizer(tmp_path):
    model = fake_diffusers_folder(tmp_path / "m", "diffusion_pytorch_model.safetensors")
    (model / "tokenizer" / "vocab.json").unlink()
    assert_refused(tmp_path, ["--model", str(model), "--out", str(tmp_path / "b")], "tokenizer")


def test_ckpt_needs_allow_pickle(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    assert_refused(tmp_path, ["--model", str(tmp_path / "model.ckpt"), "--out", str(tmp_path / "b")],
                   "--allow-pickle")


def test_unknown_checkpoint_type(tmp_path):
    (tmp_path / "model.txt").write_text("hello")
    assert_refused(tmp_path, ["--model", str(tmp_path / "model.txt"), "--out", str(tmp_path / "b")],
                   "unknown checkpoint type")


def test_broken_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    assert_refused(tmp_path, ["--model", str(tmp_path / "model.safetensors"), "--out",
                              str(tmp_path / "b")], "cannot load")


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("{}")
    assert_refused(tmp_path, ["--model", "demo", "--out", str(tmp_path / "b")], "--force")


def test_force_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    assert_refused(tmp_path, ["--model", "demo", "--out", str(tmp_path / "docs"), "--force"],
                   "not a bundle")


def test_force_never_replaces_a_folder_with_someone_elses_manifest(tmp_path):
    """A web app's manifest.json is not a bundle's: --force still refuses."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "manifest.json").write_text('{"name": "my app", "icons": []}')
    (tmp_path / "app" / "index.html").write_text("<html></html>")
    assert_refused(tmp_path, ["--model", "demo", "--out", str(tmp_path / "app"), "--force"],
                   "not a bundle")


def test_hub_id_offline(tmp_path):
    assert_refused(tmp_path, ["--model", "CompVis/stable-diffusion-v1-4", "--out", str(tmp_path / "b")],
                   "hub is not reachable", env={"HF_HUB_OFFLINE": "1"})


def test_old_opset_and_bad_arguments(tmp_path):
    assert_refused(tmp_path, ["--model", "demo", "--out", str(tmp_path / "b"), "--opset", "13"],
                   "--opset must be in [17, 20]")
    assert_refused(tmp_path, ["--model", "demo", "--out", str(tmp_path / "b"), "--opset", "99"],
                   "--opset must be in [17, 20]")
    assert_refused(tmp_path, ["--model", "demo", "--out", str(tmp_path / "b"), "--seed", str(2**64)],
                   "--seed must be in")
    assert_refused(tmp_path, ["--out", str(tmp_path / "b")], "--model")


def test_diffusers_folder_exports(demo_components, tmp_path):
    """A folder saved by diffusers' StableDiffusionPipeline.save_pretrained round-trips."""
    import json

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from export.clip_vocab import write_tokenizer_files
    from runtime.bundle import read_manifest

    c = demo_components
    write_tokenizer_files(tmp_path / "tok")
    tokenizer = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"))
    pipe = StableDiffusionPipeline(c.vae, c.text_encoder, tokenizer, c.unet, c.scheduler,
                                   c.safety_checker, CLIPImageProcessor())
    pipe.save_pretrained(tmp_path / "model")
    out = run_export("--model", str(tmp_path / "model"), "--out", str(tmp_path / "bundle"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "bundle")
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker"):
        assert any(line.startswith(f"{name}: ") for line in out.stderr.splitlines())
    m = read_manifest(tmp_path / "bundle")
    assert m.source["model"] == str(tmp_path / "model") and len(m.graphs) == 5
    sched = json.loads((tmp_path / "bundle" / "scheduler_config.json").read_text())
    assert sched == {**json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text()),
                     "_diffusers_version": sched["_diffusers_version"]}
    for f in ("vocab.json", "merges.txt"):  # transformers 5 saved tokenizer.json only
        assert (tmp_path / "bundle" / "tokenizer" / f).read_bytes() == (tmp_path / "tok" / f).read_bytes()
    demo = read_manifest(pytest.importorskip("runtime.bundle").demo_bundle())
    assert m.source["hash"] == demo.source["hash"]  # same weights as the shipped demo

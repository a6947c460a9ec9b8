"""`python -m runtime.generate`: output files, metadata, and every bad input -> one line, exit 2."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from runtime.bundle import MANIFEST, demo_bundle
from runtime.files import umask

PROMPT = "a photo of an astronaut riding a horse on mars"


def generate(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "runtime.generate", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_generates_png_with_metadata(tmp_path):
    out = generate(PROMPT, "--steps", "3", "--seed", "7", "--batch-size", "2",
                   "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    paths = out.stdout.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    with Image.open(paths[1]) as im:
        meta = im.text
        assert im.size == (64, 64)
    assert meta["prompt"] == PROMPT and meta["seed"] == "7" and meta["steps"] == "3"
    assert meta["scheduler"] == "pndm" and meta["guidance_scale"] == "7.5"
    # auto: openvino where it is installed, else ort-cpu; the PNG says which, and the precision
    chosen = re.search(r"^backend: (\S+) .*; precision (\w+)", out.stderr, re.M)
    assert chosen and chosen.group(1) in ("openvino", "ort-cpu"), out.stderr
    assert meta["size"] == "64x64" and meta["model"] == "demo"
    assert (meta["backend"], meta["precision"]) == chosen.groups()
    assert meta["batch_index"] == "1" and meta["negative_prompt"] == ""
    assert "time:" in out.stderr
    # Same command again: new names, old files untouched.
    before = {p: open(p, "rb").read() for p in paths}
    again = generate(PROMPT, "--steps", "3", "--seed", "7", "--batch-size", "2",
                     "--output-dir", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert set(again.stdout.split()).isdisjoint(paths)
    assert all(open(p, "rb").read() == b for p, b in before.items())
    assert {open(p, "rb").read() for p in again.stdout.split()} == set(before.values())


def test_no_safety_is_reported(tmp_path):
    out = generate(PROMPT, "--steps", "2", "--seed", "1", "--no-safety", "--output-dir",
                   str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "safety checker: off" in out.stderr
    with Image.open(out.stdout.split()[0]) as im:
        assert im.text["safety_checker"] == "off"


def test_long_prompt_runs_in_chunks(tmp_path):
    """200 tokens and emphasis on the shipped demo: three chunks of 77, nothing dropped;
    the PNG carries A1111's parameters text."""
    prompt = "a (red:1.3) ((apple)), [blurry] " + "word " * 190
    out = generate(prompt, "--steps", "2", "--seed", "1", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "text 3 chunk(s) of 77 tokens" in out.stderr and "dropped" not in out.stderr
    with Image.open(out.stdout.split()[0]) as im:
        params = im.text["parameters"]
    assert params.startswith(prompt + "\n")
    assert "Steps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 1, Size: 64x64" in params


def test_prompt_past_the_chunk_limit_warns(tmp_path):
    out = generate("word " * 610, "--steps", "1", "--seed", "1", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "needs more than 8 chunks of 75 tokens; its last 10 tokens were dropped" in out.stderr


def test_latents_file(tmp_path):
    lat = np.random.RandomState(0).randn(1, 4, 8, 8).astype(np.float32)
    np.save(tmp_path / "lat.npy", lat)
    out = generate(PROMPT, "--steps", "2", "--height", "64", "--width", "64", "--latents",
                   str(tmp_path / "lat.npy"), "--output-dir", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr


def _broken_bundles(tmp_path):
    bad_version = tmp_path / "v99"
    shutil.copytree(demo_bundle(), bad_version)
    m = json.loads((bad_version / MANIFEST).read_text())
    m["format_version"] = 99
    (bad_version / MANIFEST).write_text(json.dumps(m))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(demo_bundle(), corrupt)
    (corrupt / MANIFEST).write_text("{not json")
    missing_graph = tmp_path / "nounet"
    shutil.copytree(demo_bundle(), missing_graph)
    (missing_graph / "unet.onnx").unlink()
    bad_onnx = tmp_path / "badonnx"
    shutil.copytree(demo_bundle(), bad_onnx)
    (bad_onnx / "unet.onnx").write_bytes(b"garbage")
    bad_sched = tmp_path / "badsched"
    shutil.copytree(demo_bundle(), bad_sched)
    cfg = json.loads((bad_sched / "scheduler_config.json").read_text())
    (bad_sched / "scheduler_config.json").write_text(json.dumps({**cfg, "beta_schedule": "foo"}))
    renamed = tmp_path / "renamed"
    shutil.copytree(demo_bundle(), renamed)
    m = json.loads((renamed / MANIFEST).read_text())
    m["graphs"]["unet"]["outputs"][0]["name"] = "not_noise_pred"
    (renamed / MANIFEST).write_text(json.dumps(m))
    return {"v99": (bad_version, "format version 99"), "corrupt": (corrupt, "corrupt"),
            "renamed": (renamed, "not this runtime's contract"),
            "badsched": (bad_sched, "scheduler_config.json"),
            "nounet": (missing_graph, "missing unet.onnx"), "badonnx": (bad_onnx, "unet")}


BAD_ARGS = {
    "scheduler": (["--scheduler", "nope"], "unknown scheduler"),
    "steps0": (["--steps", "0"], "steps must be"),
    "height": (["--height", "100"], "height must be a multiple of 8"),
    "width_big": (["--width", "8200"], "width must be"),
    "guidance": (["--guidance-scale", "-1"], "guidance scale must be >= 0"),
    "batch0": (["--batch-size", "0"], "batch size must be"),
    "model": (["--model", "/nonexistent/bundle"], "model folder not found"),
    "backend": (["--backend", "tensorrt"], "backend tensorrt is not available"),
    "steps_text": (["--steps", "many"], "invalid int value"),
    "steps_big": (["--scheduler", "ddim", "--steps", "1001"], "steps must be at most 1000"),
    "guidance_huge": (["--guidance-scale", "1e39"], "guidance scale must be >= 0 and <= 1000"),
    "latents_missing": (["--latents", "/nonexistent.npy"], "cannot read latents"),
    "latents_shape": (["--latents", "SHAPE"], "latents must be a float array of shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments(tmp_path, case):
    args, message = BAD_ARGS[case]
    if "SHAPE" in args:
        np.save(tmp_path / "l.npy", np.zeros((1, 4, 3, 3), np.float32))
        args = [str(tmp_path / "l.npy") if a == "SHAPE" else a for a in args]
    out_dir = tmp_path / "out"
    out = generate(PROMPT, "--steps", "2", *args, "--output-dir", str(out_dir))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in out.stderr, out.stderr
    assert len([x for x in lines if x.startswith("error")]) == 1
    assert not out_dir.exists()


@pytest.mark.parametrize("case", ["height", "width_big", "latents_shape", "batch_big"])
def test_model_free_mistakes_fail_before_anything_loads(tmp_path, case):
    """Sizes, batch and a latents file's shape are checked against the manifest alone:
    one line, no engine loaded (no backend or load lines first)."""
    args, message = {**BAD_ARGS, "batch_big": (["--batch-size", "65"], "more than 64")}[case]
    if "SHAPE" in args:
        np.save(tmp_path / "l.npy", np.zeros((1, 4, 3, 3), np.float32))
        args = [str(tmp_path / "l.npy") if a == "SHAPE" else a for a in args]
    out = generate(PROMPT, "--steps", "2", *args, "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr  # one line


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 100, b"not npy"])
def test_broken_latents_files_are_one_line(tmp_path, content):
    """Empty, truncated-header or foreign files: one line, exit 2, nothing loaded."""
    (tmp_path / "l.npy").write_bytes(content)
    out = generate(PROMPT, "--latents", str(tmp_path / "l.npy"), "--output-dir",
                   str(tmp_path / "out"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: cannot read latents") and out.stderr.count("\n") == 1


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path):
    """Bytes that are not UTF-8 on the command line (a shell in latin-1): one line, exit 2,
    before any engine loads, not a tokenizer traceback."""
    out = subprocess.run([sys.executable.encode(), b"-m", b"runtime.generate", b"caf\xe9",
                          b"--output-dir", str(tmp_path / "out").encode()],
                         capture_output=True, timeout=300)
    err = out.stderr.decode(errors="replace")
    assert out.returncode == 2 and "not valid UTF-8" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("case", ["v99", "corrupt", "nounet", "badonnx", "badsched", "renamed"])
def test_bad_bundles(tmp_path, case):
    bundle, message = _broken_bundles(tmp_path)[case]
    out = generate(PROMPT, "--model", str(bundle), "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()  # info lines (backend, loads), then one error line
    assert lines[-1].startswith("error:") and sum(x.startswith("error") for x in lines) == 1
    assert not (tmp_path / "out").exists()


def test_output_dir_that_cannot_be_created():
    out = generate(PROMPT, "--steps", "1", "--output-dir", "/proc/sdrt-test-out")
    assert out.returncode == 2 and "not writable" in out.stderr.splitlines()[-1], out.stderr


def test_negative_prompt_too_long_warns_and_png_mode(tmp_path):
    out = generate(PROMPT, "--steps", "1", "--seed", "1", "--negative-prompt", "word " * 615,
                   "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "the negative prompt needs more than 8 chunks of 75 tokens; its last 15 tokens" \
        in out.stderr
    mode = (tmp_path / out.stdout.split()[0]).stat().st_mode & 0o777
    assert mode == 0o666 & ~umask()  # not mkstemp's 0600


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder should be (root ignores chmod)
    out = generate(PROMPT, "--steps", "1", "--output-dir", str(blocker / "sub"))
    assert out.returncode == 2 and "not usable" in out.stderr, out.stderr
    assert blocker.read_text() == "x"


def test_img2img_and_inpainting_from_the_cli(tmp_path):
    """--init-image/--strength and --mask on the shipped demo: the output at the init
    image's size, half the UNet calls at strength 0.5 (said in the summary line), and
    A1111's parameters text with the denoising strength."""
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (96, 131, 3), np.uint8)).save(
        tmp_path / "in.png")
    out = generate(PROMPT, "--init-image", str(tmp_path / "in.png"), "--strength", "0.5",
                   "--steps", "10", "--seed", "3", "--scheduler", "euler_a",
                   "--output-dir", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    assert "img2img at strength 0.5, euler_a 10 steps (5 UNet calls)" in out.stderr
    assert re.search(r"^time: .*unet [0-9.]+ s \(5 calls\)", out.stderr, re.M), out.stderr
    with Image.open(out.stdout.split()[0]) as im:
        assert im.size == (128, 96)  # 131x96 rounded down to multiples of 8
        meta = im.text
    assert meta["mode"] == "img2img" and meta["strength"] == "0.5"
    assert meta["parameters"].endswith(
        "Steps: 10, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 128x96, Model: demo, "
        "Denoising strength: 0.5, Version: sdrt")
    mask = np.zeros((96, 131), np.uint8)
    mask[20:60, 30:90] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = generate(PROMPT, "--init-image", str(tmp_path / "in.png"), "--mask",
                   str(tmp_path / "mask.png"), "--steps", "4", "--seed", "3", "--height", "96",
                   "--width", "128", "--output-dir", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    assert "inpaint at strength 1, pndm 4 steps (5 UNet calls)" in out.stderr
    with Image.open(out.stdout.split()[0]) as im:
        assert im.size == (128, 96) and im.text["mode"] == "inpaint"
        assert "Denoising strength: 1, Mask: inpainting" in im.text["parameters"]

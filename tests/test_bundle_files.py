"""Bundle files a careless or hostile bundle can hold instead of JSON (issue 12, item 2):
a FIFO, a device, a huge file, deep nesting, a scheduler config asking for 10^9
timesteps. Each is one line and exit 2, fast, with bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from runtime.bundle import MANIFEST, demo_bundle

SCHED = "scheduler_config.json"


def copy(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    return bundle


def fifo(path):
    path.unlink()
    os.mkfifo(path)


def device(path):
    path.unlink()
    path.symlink_to("/dev/zero")


def huge(path):
    with open(path, "wb") as f:
        f.truncate(2 << 20)  # 2 MiB (sparse): over the 1 MiB cap of our JSON files


def nested(path):
    path.write_text("[" * 100_000 + "]" * 100_000)


def timesteps(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_train_timesteps": 10**9}))


CASES = {  # name: (file, damage, message)
    "manifest-fifo": (MANIFEST, fifo, "not a bundle"),
    "manifest-device": (MANIFEST, device, "not a bundle"),
    "manifest-huge": (MANIFEST, huge, "more than 1048576 allowed"),
    "manifest-nested": (MANIFEST, nested, "corrupt"),
    "sched-fifo": (SCHED, fifo, "not a regular file"),
    "sched-device": (SCHED, device, "links outside the bundle"),
    "sched-huge": (SCHED, huge, "more than 1048576 allowed"),
    "sched-nested": (SCHED, nested, "corrupt bundle"),
    "sched-list": (SCHED, lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    "sched-timesteps": (SCHED, timesteps, "num_train_timesteps must be an integer in [1, 100000]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_bundle_file_is_one_line(tmp_path, case):
    name, damage, message = CASES[case]
    bundle = copy(tmp_path)
    damage(bundle / name)
    out = subprocess.run([sys.executable, "-m", "runtime.generate", "x", "--model", str(bundle),
                          "--steps", "2", "--output-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)  # a FIFO would hang
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert lines[-1].startswith("error:") and message in lines[-1], out.stderr
    assert not (tmp_path / "out").exists()


def _manifest_with(bundle, **unet):
    m = json.loads((bundle / MANIFEST).read_text())
    m["graphs"]["unet"].update(unet)
    (bundle / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("where", ["/etc/passwd", "../outside.bin", "sub/unet.onnx.data"])
def test_external_data_must_be_a_file_name_in_the_bundle(tmp_path, where):
    from runtime.bundle import BundleError, read_manifest

    bundle = copy(tmp_path)
    _manifest_with(bundle, external_data=where, external_sha256="0" * 64)
    with pytest.raises(BundleError, match="is not a file name in the bundle"):
        read_manifest(bundle)


def test_a_graph_linking_outside_the_bundle_is_refused(tmp_path):
    from runtime.bundle import BundleError, read_manifest

    bundle = copy(tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle / "unet.onnx", outside)
    (bundle / "unet.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="links outside the bundle"):
        read_manifest(bundle)


def test_a_cache_sidecar_cannot_point_outside_its_folder(tmp_path):
    from runtime import cache

    key = cache.CacheKey("unet", "a" * 64, "ort-cpu", "1", "any", "any", "fp32", "any")

    def build(folder):
        (folder / "unet.onnx").write_bytes(b"x")
        return folder / "unet.onnx"

    found = cache.store(key, build, tmp_path)
    side_path = found.parent / cache.SIDECAR
    side = json.loads(side_path.read_text())
    side["main"] = "../../../../etc/passwd"
    side["files"][side["main"]] = {"size": 1, "sha256": "0" * 64}
    side_path.write_text(json.dumps(side))
    with pytest.warns(cache.CacheWarning):
        assert cache.lookup(key, tmp_path) is None


def test_onnxruntime_is_pinned_to_versions_that_keep_external_data_inside():
    """onnxruntime < 1.24 loads an ONNX external-data `location` like ../outside/x.bin,
    and the runtime does not parse ONNX files itself: the pin is the guard."""
    import re
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    deps = [*project["project"]["dependencies"],
            *project["project"]["optional-dependencies"]["ort-gpu"]]
    pins = [re.match(r"onnxruntime(-gpu)?>=(\d+)\.(\d+)", d) for d in deps]
    found = [(int(m[2]), int(m[3])) for m in pins if m]
    assert len(found) == 2 and all(v >= (1, 24) for v in found), deps


@pytest.mark.parametrize("damage, message", [
    (lambda tok: huge_file(tok / "merges.txt", 65 << 20), "larger than 64 MiB"),
    (lambda tok: set_token(tok, "<|endoftext|>", 2**31 + 5), "token id 2147483653"),
])
def test_tokenizer_files_are_bounded(tmp_path, damage, message):
    bundle = copy(tmp_path)
    damage(bundle / "tokenizer")
    out = subprocess.run([sys.executable, "-m", "runtime.generate", "x", "--model", str(bundle),
                          "--steps", "2", "--output-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert lines[-1].startswith("error: corrupt bundle") and message in lines[-1], out.stderr


def huge_file(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)  # sparse


def set_token(tok, token, value):
    vocab = json.loads((tok / "vocab.json").read_text())
    vocab[token] = value
    (tok / "vocab.json").write_text(json.dumps(vocab))

"""Issue 12's fault test: an export killed mid-write leaves its temporary folders beside
the output, which the next export to it removes (and only those); the fault script's
own checks on synthetic trees; and a short real run of it (marked slow)."""

from __future__ import annotations

import fcntl
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import fault
from export.errors import ExportError
from runtime import cache

REPO = Path(__file__).resolve().parents[1]


def dead_export_leftovers(parent: Path) -> tuple[Path, Path]:
    """What `python -m export --out parent/b --force` killed mid-run leaves beside b."""
    tmp = parent / ".b.k3x_9q2z.tmp"  # a partial new bundle
    (tmp / ".unet.export").mkdir(parents=True)
    (tmp / "text_encoder.onnx").write_bytes(b"\0" * 4096)
    old = parent / ".b.a1b2c3d4.old"  # the old bundle, moved aside by _replace
    (old / "b").mkdir(parents=True)
    (old / "b" / "manifest.json").write_text("{}")
    (parent / ".b.lock").touch()  # its lock file, no longer locked
    return tmp, old


def test_export_removes_a_killed_exports_temporary_folders(tmp_path, demo_components):
    from export.bundle_writer import export_bundle

    tmp, old = dead_export_leftovers(tmp_path)
    other = tmp_path / ".b.v2.k3x_9q2z.tmp"  # another output's (b.v2): not ours to remove
    other.mkdir()
    (tmp_path / ".b.notes").write_text("not an export's")
    export_bundle(demo_components, tmp_path / "b", log=lambda msg: None)
    assert not tmp.exists() and not old.exists()
    assert other.is_dir() and (tmp_path / ".b.notes").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.notes", ".b.v2.k3x_9q2z.tmp", "b"]
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_a_running_export_keeps_its_folders_and_a_second_one_is_refused(tmp_path, demo_components):
    from export.bundle_writer import export_bundle

    tmp, old = dead_export_leftovers(tmp_path)  # here: a live export's
    with open(tmp_path / ".b.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ExportError, match="another export to .* is running"):
            export_bundle(demo_components, tmp_path / "b", log=lambda msg: None)
    assert tmp.is_dir() and old.is_dir() and not (tmp_path / "b").exists()
    assert (tmp_path / ".b.lock").is_file()  # still the running export's


def test_cache_leftovers_are_what_is_not_an_artifact_lock_or_memo(tmp_path):
    backend = tmp_path / "ort-cpu"
    good = backend / "unet-0123456789abcdef"
    good.mkdir(parents=True)
    (good / "unet.onnx").write_bytes(b"x" * 10)
    key = {f: "x" for f in ("graph", "graph_sha256", "backend", "backend_version", "device",
                            "capability", "precision", "shapes")}
    (good / cache.SIDECAR).write_text(json.dumps({
        "version": cache.SIDECAR_VERSION, "key": key, "main": "unet.onnx",
        "files": {"unet.onnx": {"size": 10, "sha256": "0" * 64}}}))
    (backend / "unet-0123456789abcdef.lock").touch()
    (good / ".sidecar.json.abc123").write_text("half")  # a killed write_atomic
    dead = backend / ".unet-0123456789abcdef.k3x_9q2z"  # a killed builder's temp folder
    dead.mkdir()
    (dead / "unet.onnx").write_bytes(b"\0" * 2000)
    (backend / "vae_decoder-fedcba9876543210").mkdir()  # no sidecar
    (tmp_path / "verified").mkdir()
    (tmp_path / "verified" / "0123.json").write_text("{}")
    (tmp_path / "verified" / ".0123.json.tmp1").write_text("{")
    found = fault.cache_leftovers(tmp_path)
    assert [str(p.relative_to(tmp_path)) for p in found] == [
        "ort-cpu/.unet-0123456789abcdef.k3x_9q2z", "ort-cpu/unet-0123456789abcdef/.sidecar.json.abc123",
        "ort-cpu/vae_decoder-fedcba9876543210", "verified/.0123.json.tmp1"]
    sizes = {d["path"]: d["bytes"] for d in fault.describe(found, tmp_path)}
    assert sizes["ort-cpu/.unet-0123456789abcdef.k3x_9q2z"] == 2000


def test_export_leftovers_beside_and_inside_the_output(tmp_path):
    reference = tmp_path / "ref"
    (reference / "tokenizer").mkdir(parents=True)
    (reference / "manifest.json").write_text("{}")
    out = tmp_path / "run" / "b"
    (out / "tokenizer").mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    (out / ".unet.export").mkdir()
    dead_export_leftovers(tmp_path / "run")
    found = fault.export_leftovers(out, reference)
    assert sorted(str(p.relative_to(out.parent)) for p in found) == [
        ".b.a1b2c3d4.old", ".b.k3x_9q2z.tmp", ".b.lock", "b/.unet.export"]


def test_kill_points_are_seeded_and_spread():
    points = fault.kill_points(20, 10.0, 6.0, random.Random(3))
    assert points == fault.kill_points(20, 10.0, 6.0, random.Random(3)) == sorted(points)
    assert len(points) == 20 and all(0 <= p <= 10 for p in points)
    assert sum(p >= 6 for p in points) >= 10  # half in the writing window
    assert len({int(p) for p in points}) == 10  # one in each second of [0, 10]


def test_same_images_compares_every_pixel():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    assert fault.same_images([a], [b])
    b[3, 4, 1] = 1
    assert not fault.same_images([a], [b])
    assert not fault.same_images([], [])  # no image is no evidence


@pytest.mark.slow
def test_fault_script_recovers_from_kills(tmp_path):
    """Two kills per phase (about a minute on 2 cores); `python -m benchmarks.fault` runs 20."""
    pytest.importorskip("torch")
    report = tmp_path / "fault.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.fault", "--kills", "2",
                        "--reference-runs", "1", "--seed", "1", "--json", str(report)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(report.read_text())
    assert d["passed"]
    for phase in ("cache", "export"):
        p = d["phases"][phase]
        assert p["kills"] == 2 and p["failures"] == 0
        assert all(not k["failures"] for k in p["records"])

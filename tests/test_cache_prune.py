"""engines.cache list/prune and the automatic size cap (runtime/cache_prune.py)."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from engines.cache import main
from runtime import cache, cache_prune, files

KEY = cache.CacheKey("unet", "a" * 64, "ort-cpu", "1.24", "any", "avx512", "fp32", "any")
DAY = 86400


def _put(tmp_path, n: int, size: int, days_ago: float):
    key = dataclasses.replace(KEY, graph_sha256=f"{n:064x}")

    def build(folder):
        (folder / "unet.onnx").write_bytes(b"x" * size)
        return folder / "unet.onnx"

    path = cache.store(key, build, tmp_path)
    t = time.time() - days_ago * DAY
    os.utime(path.parent / cache.SIDECAR, (t, t))
    return path.parent


@pytest.fixture(autouse=True)
def no_cap(monkeypatch):
    monkeypatch.setenv(cache_prune.CAP_ENV, "0")


def test_prune_by_age_then_by_size_least_recently_used_first(tmp_path, capsys):
    old, mid, new = (_put(tmp_path, i, 1000, d) for i, d in enumerate((40, 10, 1)))
    assert main(["prune", "--older-than", "30d", "--cache-dir", str(tmp_path)]) == 0
    assert not old.exists() and mid.exists() and new.exists()
    assert "unused for 40.0 days" in capsys.readouterr().out
    assert main(["prune", "--max-size", "2K", "--dry-run", "--cache-dir", str(tmp_path)]) == 0
    assert mid.exists() and "would remove" in capsys.readouterr().out
    assert main(["prune", "--max-size", "2K", "--cache-dir", str(tmp_path)]) == 0
    assert not mid.exists() and new.exists()
    assert cache.lookup(dataclasses.replace(KEY, graph_sha256=f"{2:064x}"), tmp_path) is not None


def test_list_shows_artifacts_and_leftovers(tmp_path, capsys):
    folder = _put(tmp_path, 0, 2000, 2)
    dead = folder.parent / f".{folder.name}.k1ll3d"
    dead.mkdir()
    (dead / "unet.onnx").write_bytes(b"x" * 5000)
    assert main(["list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ort-cpu" in out and "used 2.0 d ago" in out and "a process that died" in out
    assert "1 artifacts" in out
    assert main(["prune", "--cache-dir", str(tmp_path)]) == 0  # leftovers only
    assert not dead.exists() and folder.exists()


def test_an_artifact_being_built_is_never_pruned(tmp_path):
    folder = _put(tmp_path, 0, 1000, 90)
    with files.locked(folder.with_suffix(".lock")):  # another process holds its lock
        assert cache_prune.prune(tmp_path, older_than=DAY) == []
    assert folder.exists()
    assert [f for f, _, _ in cache_prune.prune(tmp_path, older_than=DAY)] == [folder]


def test_every_build_keeps_the_cache_under_its_cap(tmp_path, monkeypatch):
    old = _put(tmp_path, 0, 4000, 5)
    recent = _put(tmp_path, 1, 4000, 0.01)  # used in the last hour: kept
    monkeypatch.setenv(cache_prune.CAP_ENV, "9K")
    new = _put(tmp_path, 2, 4000, 0)
    assert not old.exists() and recent.exists() and new.exists()


@pytest.mark.parametrize("text,value", [("50G", 50 * 10**9), ("800M", 8 * 10**8),
                                        ("1.5K", 1500), ("10", 10), ("2gb", 2 * 10**9)])
def test_sizes(text, value):
    assert cache_prune.parse_size(text) == value


@pytest.mark.parametrize("argv,message", [
    (["prune", "--max-size", "lots"], "not a size"),
    (["prune", "--older-than", "soon"], "not a duration"),
    (["list", "--older-than", "3d"], "go with prune"),
    (["purge"], "invalid choice"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    try:
        code = main([*argv, "--cache-dir", str(tmp_path)])
    except SystemExit as e:  # argparse's own errors exit through OneLineParser
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_verify_hashes_everything_and_removes_the_damaged(tmp_path, capsys):
    good, bad = _put(tmp_path, 0, 1000, 1), _put(tmp_path, 1, 1000, 1)
    graph = bad / "unet.onnx"
    st = graph.stat()
    graph.write_bytes(b"y" * st.st_size)
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["verify", "--cache-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {bad}" in out and "2 artifacts hashed, 1 damaged" in out
    assert good.exists() and not bad.exists()
    assert main(["verify", "--cache-dir", str(tmp_path)]) == 0


def test_any_build_removes_what_dead_processes_left(tmp_path):
    """A killed UNet build's temp folder goes at the next build of anything, and so do
    an hour-old temp file of an atomic sidecar write and of the bundle-check memo."""
    folder = _put(tmp_path, 0, 1000, 1)
    dead = folder.parent / ".vae_decoder-0123456789abcdef.x1"
    dead.mkdir()
    (dead / "vae_decoder.onnx").write_bytes(b"x" * 5000)
    stale = [folder / ".sidecar.json.ab12", tmp_path / "verified" / ".0011.json.cd34"]
    fresh = folder / ".sidecar.json.ef56"  # being written right now: kept
    for p in [*stale, fresh]:
        p.parent.mkdir(exist_ok=True)
        p.write_text("{")
    hour_ago = time.time() - 2 * cache_prune.RECENT
    for p in stale:
        os.utime(p, (hour_ago, hour_ago))
    _put(tmp_path, 1, 1000, 0)  # any build
    assert not dead.exists() and not any(p.exists() for p in stale) and fresh.exists()
    assert folder.exists()

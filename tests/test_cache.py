"""The engine cache (runtime/cache.py): keys, sidecar checks, atomic writes, the lock."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from runtime import cache, files
from runtime.bundle import GraphEntry, Profile, graph_spec

KEY = cache.CacheKey("unet", "a" * 64 + "+" + "b" * 64, "tensorrt", "10.3.0",
                     "NVIDIA H100 80GB HBM3", "9.0", "fp16",
                     cache.shapes_json(Profile().shapes(graph_spec("unet", 768))))


def _writer(payload: bytes = b"plan-bytes" * 100):
    def build(folder: Path) -> Path:
        (folder / "unet.plan").write_bytes(payload)
        return folder / "unet.plan"
    return build


@pytest.mark.parametrize("field,value", [
    ("graph_sha256", "c" * 64), ("backend", "ort-cuda"), ("backend_version", "8.6.1"),
    ("device", "Orin"), ("capability", "8.7"), ("precision", "fp32"),
    ("shapes", cache.shapes_json(Profile(batch=(1, 1, 1)).shapes(graph_spec("unet", 768)))),
])
def test_key_changes_with_every_field(field, value):
    other = dataclasses.replace(KEY, **{field: value})
    assert other.digest != KEY.digest and other.dirname != KEY.dirname


def test_shapes_json_is_canonical():
    a = {"x": {"min": [1, 2], "opt": [1, 2], "max": [1, 2]},
         "a": {"max": [3], "opt": [2], "min": [1]}}
    b = {"a": {"min": [1], "opt": [2], "max": [3]},
         "x": {"opt": [1, 2], "min": [1, 2], "max": [1, 2]}}
    assert cache.shapes_json(a) == cache.shapes_json(b)


def test_static_profile_and_covers():
    spec = graph_spec("unet", 768)
    shapes = {"sample": (2, 4, 64, 64), "timestep": (1,), "encoder_hidden_states": (2, 77, 768)}
    static = cache.static_profile(spec, shapes)
    assert static["sample"] == {"min": [2, 4, 64, 64]} | {"opt": [2, 4, 64, 64],
                                                          "max": [2, 4, 64, 64]}
    assert cache.covers(static, shapes)
    assert not cache.covers(static, {**shapes, "sample": (2, 4, 96, 96)})
    dynamic = Profile().shapes(spec)
    assert cache.covers(dynamic, {**shapes, "sample": (2, 4, 96, 96)})
    assert not cache.covers(dynamic, {**shapes, "sample": (2, 4, 136, 64)})  # > 1024 px


def test_store_then_lookup(tmp_path):
    assert cache.lookup(KEY, tmp_path) is None
    path = cache.store(KEY, _writer(), tmp_path, meta={"seconds": 1.5})
    assert path == tmp_path / "tensorrt" / KEY.dirname / "unet.plan"
    assert cache.lookup(KEY, tmp_path) == path
    side = json.loads((path.parent / cache.SIDECAR).read_text())
    assert side["key"] == dataclasses.asdict(KEY) and side["main"] == "unet.plan"
    assert side["files"]["unet.plan"]["size"] == 1000 and side["meta"] == {"seconds": 1.5}
    assert [k for k, _ in cache.entries("tensorrt", "unet", tmp_path)] == [KEY]
    assert not [p for p in path.parent.parent.iterdir() if p.name.startswith(".")]  # no temps


def test_store_returns_existing_without_building(tmp_path):
    first = cache.store(KEY, _writer(), tmp_path)

    def fail(folder: Path) -> Path:
        raise AssertionError("must not rebuild an intact artifact")

    assert cache.store(KEY, fail, tmp_path) == first
    rebuilt = cache.store(KEY, _writer(b"new"), tmp_path, force=True)
    assert rebuilt.read_bytes() == b"new"


def test_truncated_artifact_warns_and_is_rebuilt(tmp_path):
    path = cache.store(KEY, _writer(), tmp_path)
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.warns(cache.CacheWarning, match="truncated"):
        assert cache.lookup(KEY, tmp_path) is None
    again = cache.store(KEY, _writer(), tmp_path)
    assert again == path and cache.lookup(KEY, tmp_path) == path


def test_corrupt_bytes_found_by_hash_not_by_size(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    path = cache.store(KEY, _writer(), tmp_path)
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    os.utime(path, ns=(0, 0))  # the mtime does not matter either
    path.write_bytes(bytes(data))
    with pytest.warns(cache.CacheWarning, match="recorded hash"):
        assert cache.lookup(KEY, tmp_path) is None
    # fetch (the runtime's build-on-first-use) rebuilds it, and says so
    path.write_bytes(bytes(data))
    found, status = cache.fetch(KEY, _writer())
    assert status == "rebuilt" and found == path and cache.lookup(KEY, tmp_path) == path


def test_an_entry_from_before_xxh3_is_checked_by_sha256_once(tmp_path):
    path = cache.store(KEY, _writer(), tmp_path)
    side = path.parent / cache.SIDECAR
    d = json.loads(side.read_text())
    fast = {n: f.pop("xxh3_128") for n, f in d["files"].items()}
    side.write_text(json.dumps(d))
    assert cache.lookup(KEY, tmp_path) == path  # sha256, then the sidecar gains xxh3
    assert {n: f["xxh3_128"] for n, f in json.loads(side.read_text())["files"].items()} == fast
    side.write_text(json.dumps(d))
    path.write_bytes(b"y" * path.stat().st_size)
    with pytest.warns(cache.CacheWarning, match="sha256"):
        assert cache.lookup(KEY, tmp_path) is None


def test_leftovers_of_a_killed_build_are_removed_by_the_next_build(tmp_path):
    final = cache.artifact_dir(KEY, tmp_path)
    final.parent.mkdir(parents=True)
    dead = final.parent / f".{KEY.dirname}.abc123"  # a builder killed mid-build
    dead.mkdir()
    (dead / "unet.plan").write_bytes(b"x" * 4096)
    other = final.parent / ".unet-0000000000000000.zz"  # another key's, being built now
    other.mkdir()
    with files.locked(final.parent / "unet-0000000000000000.lock"):
        cache.store(KEY, _writer(), tmp_path)
    assert not dead.exists() and other.exists()


def test_a_build_finished_by_another_process_while_waiting_is_a_hit(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    key = dataclasses.replace(KEY, backend="ort-cpu")
    cache.store(key, _writer())  # the other process's build, done while we waited
    real_find = cache.find
    calls = []

    def find(k, cache_dir=None):  # our first look, before the lock, still missed it
        calls.append(k)
        return (None, None) if len(calls) == 1 else real_find(k, cache_dir)

    monkeypatch.setattr(cache, "find", find)
    found, status = cache.fetch(key, lambda folder: pytest.fail("built twice"))
    assert status == "hit" and found is not None and len(calls) == 2


def test_missing_or_foreign_sidecar_is_a_miss(tmp_path):
    path = cache.store(KEY, _writer(), tmp_path)
    side = path.parent / cache.SIDECAR
    d = json.loads(side.read_text())
    d["key"]["device"] = "Orin"
    side.write_text(json.dumps(d))
    with pytest.warns(cache.CacheWarning, match="no valid"):
        assert cache.lookup(KEY, tmp_path) is None
    side.unlink()
    with pytest.warns(cache.CacheWarning):
        assert cache.lookup(KEY, tmp_path) is None


def test_failed_build_leaves_nothing(tmp_path):
    def crash(folder: Path) -> Path:
        (folder / "unet.plan").write_bytes(b"half a plan")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError, match="builder died"):
        cache.store(KEY, crash, tmp_path)
    root = tmp_path / "tensorrt"
    assert cache.lookup(KEY, tmp_path) is None
    assert sorted(p.name for p in root.iterdir()) == [f"{KEY.dirname}.lock"]


def test_write_atomic(tmp_path):
    target = tmp_path / "sub" / "timing.cache"
    files.write_atomic(target, b"one")
    files.write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["timing.cache"]


def _try_lock(lock_path: str, queue) -> None:
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            queue.put("acquired")
        except BlockingIOError:
            queue.put("blocked")


def test_lock_excludes_other_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    lock = cache.artifact_dir(KEY, tmp_path).with_suffix(".lock")
    q = ctx.Queue()
    with cache.locked(KEY, tmp_path):
        p = ctx.Process(target=_try_lock, args=(str(lock), q))
        p.start()
        p.join(10)
        assert q.get(timeout=5) == "blocked"
    p = ctx.Process(target=_try_lock, args=(str(lock), q))
    p.start()
    p.join(10)
    assert q.get(timeout=5) == "acquired"


def _build_in_child(cache_dir: str, counter: str) -> None:
    def slow(folder: Path) -> Path:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough for the other process to reach the lock
        (folder / "unet.plan").write_bytes(b"x" * 1000)
        return folder / "unet.plan"

    cache.store(KEY, slow, Path(cache_dir))


def test_two_processes_build_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    counter = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), str(counter)))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1  # the second found the first's
    assert cache.lookup(KEY, tmp_path).read_bytes() == b"x" * 1000


def test_ort_cuda_key_is_device_independent():
    spec = graph_spec("unet", 768)
    entry = GraphEntry(spec, "a" * 64, "unet.onnx.data", "b" * 64)
    key = cache.ort_cuda_key(entry, "1.20.1")
    assert key == cache.ort_cuda_key(entry, "1.20.0")  # major.minor only
    assert key != cache.ort_cuda_key(entry, "1.21.0")
    assert (key.device, key.capability, key.shapes, key.precision) == (
        cache.ANY, cache.ANY, cache.ANY, "fp16")
    assert key.graph_sha256 == "a" * 64 + "+" + "b" * 64
    other = GraphEntry(spec, "c" * 64, "unet.onnx.data", "b" * 64)
    assert cache.ort_cuda_key(other, "1.20.1") != key


def test_default_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert cache.default_dir() == tmp_path
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_dir() == tmp_path / "xdg" / "sdrt" / "engines"


def test_an_artifact_unchanged_since_it_matched_is_not_hashed_again(tmp_path, monkeypatch):
    from runtime import integrity

    monkeypatch.setattr(integrity, "RACY_SECONDS", 0.0)  # files written just now count
    path = cache.store(KEY, _writer(), tmp_path)
    assert cache.lookup(KEY, tmp_path) == path  # hashed once, stamp recorded
    with monkeypatch.context() as m:
        m.setattr(integrity, "fast_hash", lambda p: pytest.fail("hashed again"))
        assert cache.lookup(KEY, tmp_path) == path
    st = path.stat()
    path.write_bytes(b"z" * st.st_size)  # any write changes the stamp (ctime)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(cache.CacheWarning, match="recorded hash"):
        assert cache.lookup(KEY, tmp_path) is None


def test_a_file_changed_moments_ago_is_hashed_but_its_stamp_not_recorded(tmp_path, monkeypatch):
    """The racy case: a write in the same clock tick right after the hash would leave the
    stamp equal, so a file changed within RACY_SECONDS of the check is hashed every time."""
    from runtime import integrity

    path = cache.store(KEY, _writer(), tmp_path)  # written just now
    calls = []
    real = integrity.fast_hash
    monkeypatch.setattr(integrity, "fast_hash", lambda p: calls.append(p) or real(p))
    assert cache.lookup(KEY, tmp_path) == path and cache.lookup(KEY, tmp_path) == path
    assert len(calls) == 2  # hashed both times: no stamp was recorded
    assert "stamp" not in json.loads((path.parent / cache.SIDECAR).read_text())["files"]["unet.plan"]

"""Every file the runtime loads is checked against its recorded hash (runtime/integrity.py):
bundle graphs on a thread beside the engine loads, cache artifacts at lookup."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import xxhash

from runtime import integrity
from runtime.bundle import MANIFEST, BundleError, demo_bundle
from runtime.pipeline import Pipeline


@pytest.mark.parametrize("size", [0, 1, integrity.CHUNK - 1, integrity.CHUNK + 7])
def test_hashes_are_the_standard_ones(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    sha, fast = integrity.file_hashes(tmp_path / "f")
    assert sha == hashlib.sha256(data).hexdigest()
    assert fast == integrity.fast_hash(tmp_path / "f") == xxhash.xxh3_128(data).hexdigest()


def _damage_keeping_size_and_mtime(path):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("recorded", ["xxh3", "sha256 only"])
def test_a_graph_damaged_after_the_cache_was_built_is_refused(tmp_path, monkeypatch, recorded):
    """The ORT CPU cache is keyed on the graph's size and mtime: a graph damaged in
    place with both kept would hit the cache and make a wrong image with exit 0."""
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    if recorded != "xxh3":  # a bundle exported before xxh3 was recorded
        m = json.loads((bundle / MANIFEST).read_text())
        for g in m["graphs"].values():
            g.pop("xxh3")
        (bundle / MANIFEST).write_text(json.dumps(m))
    lines = []
    with Pipeline(bundle, "ort-cpu", safety=False, log=lines.append) as pipe:
        assert f"match the manifest ({'xxh3_128' if recorded == 'xxh3' else 'sha256'}" \
            in pipe.load_report.check
    assert any(x.startswith("bundle check: 3 files match") for x in lines), lines
    _damage_keeping_size_and_mtime(bundle / "unet.onnx")
    with pytest.raises(BundleError, match="unet.onnx does not match its hash"):
        Pipeline(bundle, "ort-cpu", safety=False)
    out = subprocess.run([sys.executable, "-m", "runtime.generate", "x", "--model", str(bundle),
                          "--backend", "ort-cpu", "--output-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, env={**os.environ, "CI": "1"})
    last = out.stderr.strip().splitlines()[-1]  # after the load log
    assert out.returncode == 2 and out.stderr.count("error") == 1, out.stderr
    assert last.startswith("error:") and "does not match its hash" in last
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def test_an_unreadable_graph_is_one_line(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    os.chmod(bundle / "vae_decoder.onnx", 0)
    if os.access(bundle / "vae_decoder.onnx", os.R_OK):
        pytest.skip("running as root: a file without read permission is still readable")
    with pytest.raises(BundleError):
        Pipeline(bundle, "ort-cpu", safety=False)


def test_the_check_runs_beside_the_loads(monkeypatch):
    """The check starts before the first engine loads and is waited for at the end."""
    events = []
    real = integrity.BundleCheck

    class Spy(real):
        def __init__(self, *args):
            events.append("check started")
            super().__init__(*args)

        def result(self):
            events.append("check waited for")
            return super().result()

    monkeypatch.setattr(integrity, "BundleCheck", Spy)
    with Pipeline("demo", "ort-cpu", safety=False, log=events.append):
        pass
    assert events[0] == "check started" and events[-2] == "check waited for"
    assert events[-1].startswith("bundle check:") and any("unet: loaded" in e for e in events)


def test_a_file_unchanged_since_it_matched_is_not_hashed_again(tmp_path, monkeypatch):
    """A warm start costs a stat per file: the memo in the engine cache remembers each
    file's stamp; any write (same size, mtime put back) changes the ctime and re-hashes."""
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(integrity, "RACY_SECONDS", 0.0)  # files written just now count
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    with Pipeline(bundle, "ort-cpu", safety=False) as pipe:
        assert "3 hashed" in pipe.load_report.check
    Pipeline(bundle, "ort-cpu", safety=False).close()  # the cache's first lookups hash
    monkeypatch.setattr(integrity, "fast_hash", lambda p: pytest.fail(f"hashed {p}"))
    with Pipeline(bundle, "ort-cpu", safety=False) as pipe:
        assert "0 hashed" in pipe.load_report.check and "3 unchanged" in pipe.load_report.check
    monkeypatch.undo()
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    _damage_keeping_size_and_mtime(bundle / "vae_decoder.onnx")
    with pytest.raises(BundleError, match="vae_decoder.onnx does not match"):
        Pipeline(bundle, "ort-cpu", safety=False)


def test_an_artifact_built_from_a_damaged_graph_is_never_used_after_a_restore(tmp_path,
                                                                             monkeypatch):
    """ORT's optimized graph is built at load, and only after its source matched the
    manifest's hashes: nothing is built from a damaged graph, so restoring the good
    file with `cp -p` (size and mtime kept) meets no artifact made from the damage and
    the image is the good one."""
    import numpy as np

    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    with Pipeline(bundle, "ort-cpu", safety=False) as pipe:
        want = pipe("x", steps=2, seed=3).images
    good = tmp_path / "good.onnx"
    shutil.copy2(bundle / "unet.onnx", good)
    shutil.rmtree(tmp_path / "cache")
    _damage_keeping_size_and_mtime(bundle / "unet.onnx")
    with pytest.raises(BundleError):
        Pipeline(bundle, "ort-cpu", safety=False)
    subprocess.run(["cp", "-p", str(good), str(bundle / "unet.onnx")], check=True)
    with Pipeline(bundle, "ort-cpu", safety=False) as pipe:
        assert pipe.load_report.graphs["unet"].cache == "built"  # not the damaged one
        np.testing.assert_array_equal(pipe("x", steps=2, seed=3).images, want)


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_no_artifact_is_built_from_damaged_external_data(tmp_path, monkeypatch, backend):
    """The artifacts built at load (ORT's optimized graph, OpenVINO's fp16 IR) are keyed
    on the manifest's hashes, so they are built only after the graph and its external
    data matched them: damaged weights (same size) leave nothing in the cache, and the
    restored bundle draws the undamaged image."""
    import numpy as np

    from runtime.bundle import SCHEDULER_CONFIG, TOKENIZER_DIR
    from tests.fakes.tiny_bundle import make_bundle

    if backend == "openvino":
        pytest.importorskip("openvino")
    bundle = make_bundle(tmp_path / "bundle")  # its UNet keeps its weights in unet.onnx.data
    shutil.copy(demo_bundle() / SCHEDULER_CONFIG, bundle)
    shutil.copytree(demo_bundle() / TOKENIZER_DIR, bundle / TOKENIZER_DIR)
    kw = {"precision": "bf16"} if backend == "openvino" else {}
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "reference-cache"))  # same path: IR
    with Pipeline(bundle, backend, safety=False, **kw) as pipe:
        want = pipe("x", steps=2, seed=3).images
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    good = tmp_path / "good.data"
    shutil.copy2(bundle / "unet.onnx.data", good)
    _damage_keeping_size_and_mtime(bundle / "unet.onnx.data")
    with pytest.raises(BundleError, match="unet.onnx.data does not match its hash"):
        Pipeline(bundle, backend, safety=False, **kw)
    built = [p.name for p in (tmp_path / "cache").glob("*/unet-*") if p.is_dir()]
    assert built == [], built  # nothing made from the damaged weights
    shutil.copy(good, bundle / "unet.onnx.data")  # restored: new inode and ctime, same key
    with Pipeline(bundle, backend, safety=False, **kw) as pipe:
        np.testing.assert_array_equal(pipe("x", steps=2, seed=3).images, want)

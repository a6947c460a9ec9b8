"""Fast integrity checks of the files the runtime loads: bundle graphs and cached artifacts.

sha256 of a full-size v1-4 UNet (3.4 GB) takes 2.0 s on our 2-core EPYC, about what
loading it from the engine cache costs, so it was checked only after a failure, and a
file damaged at the same size was loaded silently. xxh3-128 reads the same file in
0.36 s (page cache, mmap) and releases the GIL, so the bundle check runs on a thread
beside the engine loads (`BundleCheck`) and the cache check runs inline. Not a
defence against a deliberate forger (who can rewrite the manifest too), which is
what sha256 in the manifest stays for; a check against damage and stale edits.

Each hash is the hex digest; files are read through mmap (no copy into Python).
"""

from __future__ import annotations

import hashlib
import mmap
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import xxhash

FAST = "xxh3_128"  # the name recorded beside each digest (manifest, cache sidecars)
CHUNK = 1 << 24


def _blocks(path: Path) -> Iterable[memoryview]:
    """The file's bytes in CHUNK-sized views of one mmap (an empty file: nothing)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
            for start in range(0, size, CHUNK):
                block = view[start:start + CHUNK]
                try:
                    yield block
                finally:
                    block.release()


def fast_hash(path: Path) -> str:
    """xxh3-128 of a file, hex."""
    h = xxhash.xxh3_128()
    for block in _blocks(Path(path)):
        h.update(block)
    return h.hexdigest()


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, xxh3-128) of a file in one read: what export and the cache record."""
    sha, fast = hashlib.sha256(), xxhash.xxh3_128()
    for block in _blocks(Path(path)):
        sha.update(block)
        fast.update(block)
    return sha.hexdigest(), fast.hexdigest()


def matches(path: Path, sha256: str | None, xxh3: str | None) -> bool:
    """True when the file matches its recorded hash: xxh3 where recorded (fast), else
    sha256 (bundles and cache entries written before xxh3 was recorded); no hash: True."""
    if xxh3:
        return fast_hash(path) == xxh3
    if sha256:
        return file_hashes(path)[0] == sha256
    return True


class BundleCheck:
    """Hash files on a background thread while the engines load; `result()` waits and
    returns the first file that does not match (None: all do). The runtime calls it
    before it returns from loading, so no image is ever made from a damaged file."""

    def __init__(self, files: Iterable[tuple[Path, str | None, str | None]]):
        self.files = list(files)  # (path, sha256, xxh3)
        self.seconds = 0.0
        self.bad: Path | None = None
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="bundle-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t = time.perf_counter()
        try:
            for path, sha, fast in self.files:
                if not matches(path, sha, fast):
                    self.bad = path
                    break
        except OSError as e:
            self.error = e
        self.seconds = time.perf_counter() - t

    def result(self) -> Path | None:
        """The first mismatching file, or None; re-raises an OSError reading them."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.bad

    @property
    def algorithm(self) -> str:
        """What the files were checked with: xxh3 when every one had it recorded."""
        return FAST if all(fast for _, _, fast in self.files) else "sha256"

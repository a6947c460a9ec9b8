"""Fast integrity checks of the files the runtime loads: bundle graphs and cached artifacts.

sha256 of a full-size v1-4 UNet (3.4 GB) takes 2.0 s on our 2-core EPYC, about what
loading it from the engine cache costs, so it was checked only after a failure, and a
file damaged at the same size was loaded silently. xxh3-128 reads the same file in
0.42 s (page cache) and releases the GIL, so the bundle check runs on a thread beside
the engine loads (`BundleCheck`) and the cache check runs inline.

Even that is 25% of a warm ort-cpu start (1.5 s), so a file is hashed only when its
`stamp` (size, mtime, ctime, inode) differs from the one recorded when it last
matched: any write, copy or replacement through the file system changes it. What a
stamp cannot see is damage below the file system (bit rot on a disk that does not
checksum); `python -m engines.cache verify` hashes every artifact for that.

Not a defence against a deliberate forger (who can rewrite the manifest too); a check
against damage, interrupted copies and edits after export.

Each hash is the hex digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import xxhash

from runtime.files import read_small, write_atomic

FAST = "xxh3_128"  # the name recorded beside each digest (manifest, cache sidecars)
CHUNK = 1 << 24
RACY_SECONDS = 2.0  # see `recordable`


def _blocks(path: Path) -> Iterable[memoryview]:
    """The file's bytes in CHUNK-sized reads into one reused buffer: not mmap, whose
    pages would count in the process's RSS (3.4 GB for a full UNet) until unmapped."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            yield view[:n]


def stamp(path: Path) -> list[int]:
    """What changes whenever a file is written, replaced or copied (size, mtime, ctime,
    inode): a file whose stamp is the one recorded when it was hashed has not been
    written through the file system since, so it need not be hashed again (as git's
    index). On Linux file systems ctime cannot be set back by a user (os.utime sets it
    to now); on FAT/exFAT (no ctime, 2 s mtime) an edit that keeps size and mtime (touch
    -d) is not seen: `engines.cache verify` hashes in full."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def recordable(st: list[int], started: float) -> bool:
    """A stamp may be recorded only if the file last changed well before hashing began:
    a write in the same clock tick right after the hash would leave the stamp equal.
    Both times count: on FAT/exFAT ctime is the creation time and mtime ticks in 2 s."""
    return max(st[1], st[2]) < (started - RACY_SECONDS) * 1e9


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
    """Check files on a background thread while the engines load; `result()` waits and
    returns the first file that does not match (None: all do). The runtime calls it
    before it returns from loading, so no image is ever made from a damaged file.

    `memo` (a JSON file in the engine cache) remembers each file's stamp and the hash it
    was found to match: a file with the same stamp is not hashed again, so a warm start
    costs a few stat calls. Without a memo (or one that cannot be written) every file
    is hashed at every load."""

    def __init__(self, files: Iterable[tuple[Path, str | None, str | None]],
                 memo: Path | None = None):
        self.files = list(files)  # (path, sha256, xxh3)
        self.memo = memo
        self.seconds = 0.0
        self.hashed = 0  # files read and hashed (the others were unchanged since)
        self.bad: Path | None = None
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="bundle-check", daemon=True)
        self._thread.start()

    def _load_memo(self) -> dict:
        if self.memo is None:
            return {}
        try:
            d = json.loads(read_small(self.memo, 1 << 20))
        except (OSError, ValueError, RecursionError):
            return {}
        return d if isinstance(d, dict) else {}

    def _run(self) -> None:
        t = time.perf_counter()
        memo, changed = self._load_memo(), False
        try:
            for path, sha, fast in self.files:
                key, want = str(path.resolve()), fast or sha
                st = stamp(path)
                if memo.get(key) == {"stamp": st, "hash": want}:
                    continue
                started = time.time()
                self.hashed += 1
                if not matches(path, sha, fast):
                    self.bad = path
                    memo.pop(key, None)
                    changed = True
                    break
                if recordable(st, started):
                    memo[key], changed = {"stamp": st, "hash": want}, True
        except OSError as e:
            self.error = e
        if changed and self.memo is not None:
            with contextlib.suppress(OSError):  # a read-only cache: hash again next time
                write_atomic(self.memo, json.dumps(memo, indent=1))
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

    def describe(self) -> str:
        """One line for the load log, e.g. '4 files match the manifest (xxh3_128; 1 hashed
        in 0.41 s beside the loads, 3 unchanged since checked)'."""
        unchanged = len(self.files) - self.hashed
        return (f"{len(self.files)} files match the manifest ({self.algorithm}; {self.hashed} "
                f"hashed in {self.seconds:.2f} s beside the loads"
                + (f", {unchanged} unchanged since checked)" if unchanged else ")"))

"""What the engine cache holds, and removing what is not worth keeping.

- `artifacts`: every artifact folder with its size and when it was last used (the
  sidecar's mtime: runtime.cache.lookup touches it on every hit).
- `leftovers`: temporary folders of builds that died (kill -9, power loss), found by
  their lock being free (a full UNet's is several GB), and stale temp files of atomic
  writes.
- `prune`: remove leftovers, artifacts unused for longer than `older_than`, then the
  least recently used until the cache fits `max_size`. Each artifact is removed under
  its own lock, taken without waiting: one being built or rebuilt right now is skipped.
- `enforce_cap`: after every build, remove leftovers and `prune` to
  $SDRT_CACHE_MAX_SIZE (default 50 GB), keeping the artifact just built and anything
  used in the last hour.

A reader that already opened or mapped a removed artifact keeps it (POSIX unlink);
the next lookup misses and rebuilds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime import cache

CAP_ENV = "SDRT_CACHE_MAX_SIZE"
DEFAULT_CAP = 50 * 10**9  # bytes: room for every backend's artifacts of a few bundles
RECENT = 3600.0  # seconds: the automatic cap never removes what was used this recently
UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


@dataclass(frozen=True)
class Artifact:
    folder: Path
    backend: str
    graph: str
    size: int  # bytes, every file in the folder
    last_used: float  # epoch seconds
    valid: bool  # has a readable sidecar of this cache version


def parse_size(text: str) -> int:
    """'50G', '800M', '1.5T', '0' -> bytes (powers of 1000, as disks are sold); ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 50G, 800M)")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s' -> seconds; ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms])\s*", text.lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 30d, 12h)")
    return float(m.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[m.group(2)]


def _size(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_size
    return total


def artifacts(cache_dir: Path | None = None) -> list[Artifact]:
    """Every artifact folder, least recently used first."""
    root = Path(cache_dir or cache.default_dir())
    found = []
    for backend in sorted(p for p in root.glob("*") if p.is_dir() and not p.is_symlink()):
        for folder in backend.iterdir():
            if folder.name.startswith(".") or not folder.is_dir() or folder.is_symlink():
                continue
            side = folder / cache.SIDECAR
            try:
                used = side.stat().st_mtime
            except OSError:
                used = folder.stat().st_mtime
            found.append(Artifact(folder, backend.name, folder.name.rsplit("-", 1)[0],
                                  _size(folder), used,
                                  cache._read_sidecar(folder) is not None))
    return sorted(found, key=lambda a: (a.last_used, str(a.folder)))


def _lock_of(folder: Path) -> Path:
    """The lock file of an artifact folder, or of a temp folder `.<dirname>.<suffix>`."""
    name = folder.name
    if name.startswith("."):
        name = name[1:].split(".", 1)[0]
    return folder.parent / f"{name}.lock"


@contextlib.contextmanager
def _try_lock(folder: Path) -> Iterator[bool]:
    """True while we hold the folder's lock; False when a live process holds it."""
    lock = _lock_of(folder)
    try:
        f = open(lock, "a+")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def leftovers(cache_dir: Path | None = None) -> list[tuple[Path, int]]:
    """(path, bytes) of what dead processes left: temporary build folders whose lock is
    free, and temporary files of atomic writes (`.name.XXXX`: a sidecar's stamps, the
    bundle-check memo) older than an hour (a live writer's exists for milliseconds)."""
    root = Path(cache_dir or cache.default_dir())
    out = []
    old = time.time() - RECENT
    for path in [*root.glob("*/.*"), *root.glob("*/*/.*")]:
        if path.is_symlink():
            continue
        if path.is_dir() and path.parent.parent == root:
            with _try_lock(path) as mine:
                if mine:
                    out.append((path, _size(path)))
        elif path.is_file():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < old:
                    out.append((path, path.stat().st_size))
    return out


def _remove(folder: Path) -> bool:
    """Remove an artifact or leftover folder under its lock (False: in use, or gone)."""
    with _try_lock(folder) as mine:
        if not mine or not folder.exists():
            return False
        aside = folder.with_name(f".{folder.name}.old.{os.getpid()}")
        try:
            os.rename(folder, aside)  # lookups see it gone at once, then delete at leisure
        except OSError:
            return False
        shutil.rmtree(aside, ignore_errors=True)
        return True


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False


def prune(cache_dir: Path | None = None, older_than: float | None = None,
          max_size: int | None = None, keep: Path | None = None, recent: float = 0.0,
          dry_run: bool = False) -> list[tuple[Path, int, str]]:
    """Remove leftovers, artifacts unused for `older_than` seconds, then the least
    recently used until the total is at most `max_size` bytes; never `keep` nor one used
    within `recent` seconds. Returns (folder, bytes, why) of what was (or, with
    `dry_run`, would be) removed."""
    now = time.time()
    removed = []
    for path, size in leftovers(cache_dir):
        if dry_run or (_remove(path) if path.is_dir() else _unlink(path)):
            removed.append((path, size, "left by a process that died"))
    items = artifacts(cache_dir)
    total = sum(a.size for a in items)
    for a in items:  # least recently used first
        if keep is not None and a.folder == keep or now - a.last_used < recent:
            continue
        if older_than is not None and now - a.last_used > older_than:
            why = f"unused for {(now - a.last_used) / 86400:.1f} days"
        elif max_size is not None and total > max_size:
            why = "least recently used, over the size cap"
        else:
            continue
        if not a.valid:
            why += " (no valid sidecar: damaged, or another version's)"
        if dry_run or _remove(a.folder):
            removed.append((a.folder, a.size, why))
            total -= a.size
    return removed


def cap_from_env() -> int | None:
    """$SDRT_CACHE_MAX_SIZE in bytes (0 or 'none': no cap), else DEFAULT_CAP."""
    text = os.environ.get(CAP_ENV, "").strip()
    if not text:
        return DEFAULT_CAP
    if text.lower() in ("0", "none", "off"):
        return None
    try:
        return parse_size(text)
    except ValueError:
        return DEFAULT_CAP  # a typo must not turn the cap off nor stop a build


def enforce_cap(cache_dir: Path | None = None, keep: Path | None = None) -> None:
    """After a build: remove what dead processes left (a killed UNet build leaves GBs,
    and the next build of that artifact may never come), and keep the cache under its
    cap. Best effort, never raises OSError."""
    cap = cap_from_env()
    with contextlib.suppress(OSError):
        prune(cache_dir)  # leftovers only
        if cap is not None and sum(a.size for a in artifacts(cache_dir)) > cap:
            prune(cache_dir, max_size=cap, keep=keep, recent=RECENT)

"""Small file-system helpers every stage shares (stdlib only): atomic writes, a
process lock on a file, and the question "can a folder be created here?".

POSIX only (fcntl), which covers Linux and Jetson.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

# os.link's errors where a file system has no hard links (vfat: EPERM; others: ENOTSUP,
# EOPNOTSUPP, EMLINK, ENOSYS; EXDEV cannot happen, the temp file is in the same folder)
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def _write_temp(folder: Path, data: bytes | str, prefix: str, suffix: str = "") -> str:
    """`data` in a new temp file in `folder`, flushed to disk, with the mode a plain
    write would give (mkstemp makes 0600). The caller renames or links, then unlinks."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def umask() -> int:
    """The process umask, read without changing it where Linux says it (4.7+); else by
    setting and restoring it (os.umask can only be read that way)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` atomically: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = _write_temp(path.parent, data, f".{path.name}.")
    _replace(tmp, path, undo=tmp)


def _replace(tmp: str, path: Path, undo: str | Path) -> None:
    """os.replace(tmp, path); when that fails (or is interrupted), remove `undo`, the
    file of ours that would otherwise be left behind, and re-raise."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(undo)
        raise


def write_new_file(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write `data` to folder/stem[-k]suffix, never overwriting and never half-written:
    os.link publishes the temp file under the first free name atomically (it fails
    instead of replacing an existing file). Where the file system has no hard links
    (FAT/exFAT SD cards on Jetsons: EPERM), the name is reserved empty with O_EXCL
    and the temp file renamed over it: a reader may see it empty, never partial."""
    tmp = _write_temp(Path(folder), data, ".tmp-", suffix)
    try:
        for k in range(100_000):
            path = Path(folder) / (f"{stem}{'' if k == 0 else f'-{k}'}{suffix}")
            try:
                _publish(tmp, path)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free file name for {Path(folder) / stem}{suffix}")
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed into place by the fallback
            os.unlink(tmp)


def _publish(tmp: str, path: Path) -> None:
    """`tmp` under the new name `path`; FileExistsError when the name is taken."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~umask()))
    _replace(tmp, path, undo=path)  # the reserved empty name goes again


def write_all_new(folder: Path, files: list[tuple[str, str, bytes]]) -> list[Path]:
    """write_new_file for each (stem, suffix, data), all or nothing: when one fails (a
    full disk halfway through a batch), those already written are removed again."""
    done: list[Path] = []
    try:
        for stem, suffix, data in files:
            done.append(write_new_file(folder, stem, suffix, data))
    except BaseException:
        for p in done:
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise
    return done


@contextlib.contextmanager
def locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (created if missing; blocks until free)."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_small(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most `max_bytes`; OSError otherwise. A FIFO (which
    would block forever), a device (/dev/zero grows without end) or an oversized file in
    a bundle is refused instead of read."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise OSError(f"{path} is {st.st_size} bytes, more than {max_bytes} allowed")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while read
        raise OSError(f"{path} is more than {max_bytes} bytes")
    return data


def why_not_creatable(folder: Path) -> str | None:
    """None when `folder` exists as a writable folder or could be created (its nearest
    existing ancestor is a writable folder), else why not, in a few words. A cheap
    early check (os.access): only writing into it proves it (root passes os.access)."""
    try:
        probe = Path(folder).absolute()
        while not probe.exists() and not probe.is_symlink():
            probe = probe.parent
        probe = probe.resolve()
    except (OSError, RuntimeError) as e:  # symlink loops, unreadable parents
        return str(e)
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None

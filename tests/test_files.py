"""runtime/files.py: new files are never half-written nor overwritten, on file systems
with and without hard links, and a batch is written all or nothing."""

from __future__ import annotations

import errno
import os

import pytest

from runtime import files


def test_names_are_never_reused(tmp_path):
    paths = [files.write_new_file(tmp_path, "img", ".png", bytes([i])) for i in range(3)]
    assert [p.name for p in paths] == ["img.png", "img-1.png", "img-2.png"]
    assert [p.read_bytes() for p in paths] == [b"\0", b"\1", b"\2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img-2.png", "img.png"]


def test_without_hard_links_the_name_is_reserved_then_replaced(tmp_path, monkeypatch):
    """FAT/exFAT (Jetson SD cards) refuse os.link with EPERM."""
    (tmp_path / "img.png").write_bytes(b"old")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = files.write_new_file(tmp_path, "img", ".png", b"new")
    assert path.name == "img-1.png" and path.read_bytes() == b"new"
    assert (tmp_path / "img.png").read_bytes() == b"old"  # never overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img.png"]  # no temp left
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~files.umask())


def test_other_link_errors_are_not_hidden(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    with pytest.raises(OSError, match="No space"):
        files.write_new_file(tmp_path, "img", ".png", b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_batch_that_fails_halfway_leaves_nothing(tmp_path, monkeypatch):
    real, calls = files.write_new_file, []

    def third_fails(folder, stem, suffix, data):
        calls.append(stem)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, stem, suffix, data)

    monkeypatch.setattr(files, "write_new_file", third_fails)
    (tmp_path / "keep.png").write_bytes(b"earlier run")
    with pytest.raises(OSError, match="No space"):
        files.write_all_new(tmp_path, [(f"img-{i}", ".png", b"x") for i in range(4)])
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]

"""Torch-free checks of the CLI's arguments, run before anything heavy is imported, so a
mistake costs a second, not a torch import. Each raises ExportError with one line."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from export.errors import ExportError
from runtime.bundle import MANIFEST

BUILT_IN = ("demo", "sd14-random")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_TIMEOUT_S = 3.0


def check_out(out: str | os.PathLike, force: bool) -> None:
    """Raise unless `out` may be written: free, or an old bundle (or empty folder) with force."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"{out} is a non-empty folder without {MANIFEST} (not a bundle); "
                          f"refusing to replace it, choose another --out")


def check_opset(opset: int) -> None:
    if opset < 17:
        raise ExportError(f"--opset must be >= 17, got {opset}")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not answer within `timeout` s."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def model_kind(model: str, allow_pickle: bool = False) -> str:
    """"built-in", "folder", "file" or "hub" for a --model value, or raise ExportError."""
    if model in BUILT_IN:
        return "built-in"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ExportError(f"{path} is not a diffusers model (no model_index.json)")
        return "folder"
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ExportError(f"{path} is a pickle checkpoint ({path.suffix}), which can run code "
                              f"when loaded; pass --allow-pickle if you trust it, or use .safetensors")
        if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
            raise ExportError(f"{path}: unknown checkpoint type {path.suffix!r} "
                              f"(expected .safetensors, or .ckpt with --allow-pickle)")
        return "file"
    if HUB_ID.match(model):
        if not hub_reachable():
            raise ExportError(f"{model} is not a local folder and the Hugging Face hub is not "
                              f"reachable (offline); download the model elsewhere and pass its folder")
        return "hub"
    raise ExportError(f"model folder or file not found: {model}")

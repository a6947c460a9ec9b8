"""Torch-free checks of the CLI's arguments, run before anything heavy is imported, so a
mistake costs a second, not a torch import. Each raises ExportError with one line."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from export.errors import ExportError
from export.tokenizer_files import has_tokenizer
from runtime.bundle import MANIFEST, Profile, fit_profile
from runtime.files import why_not_creatable

BUILT_IN = ("demo", "sd14-random")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_TIMEOUT_S = 3.0
REQUIRED = ("text_encoder", "unet", "vae", "scheduler", "tokenizer")  # diffusers subfolders


def check_out(out: str | os.PathLike, force: bool) -> None:
    """Raise unless `out` may be written: free, or an old bundle (or empty folder) with force."""
    out = Path(out)
    if not out.exists():
        why = why_not_creatable(out)
        if why:
            raise ExportError(f"cannot create {out}: {why}")
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if any(out.iterdir()) and not _is_bundle(out):
        raise ExportError(f"{out} is a non-empty folder that is not a bundle (no {MANIFEST} "
                          f"of ours); refusing to replace it, choose another --out")


def _is_bundle(folder: Path) -> bool:
    """Whether `folder` holds one of our manifests (not just any manifest.json, say a web
    app's): a JSON object with our format_version and graphs, read with a size cap."""
    path = folder / MANIFEST
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and isinstance(d.get("graphs"), dict) and "format_version" in d


def export_profile(default: int, min_size: int | None, max_size: int | None,
                   max_batch: int | None, base: Profile | None = None) -> Profile:
    """runtime.bundle.fit_profile, its one-line errors as ExportError."""
    try:
        return fit_profile(default, min_size, max_size, max_batch, base)
    except ValueError as e:
        raise ExportError(str(e)) from None


def check_profile_flags(min_size: int | None, max_size: int | None,
                        max_batch: int | None) -> None:
    """Bounds that are wrong whatever the model (multiples of 8, min <= max), before the
    model loads; whether they contain its default size is checked once it has."""
    hi = max_size if isinstance(max_size, int) and max_size >= 8 else 1 << 20
    lo = min_size if isinstance(min_size, int) and 8 <= min_size <= hi else 8
    export_profile(lo, min_size, max_size, max_batch)  # lo stands in for the default size


MAX_OPSET = 20  # the legacy TorchScript exporter's newest opset in torch 2.x


def check_opset(opset: int) -> None:
    if not 17 <= opset <= MAX_OPSET:
        raise ExportError(f"--opset must be in [17, {MAX_OPSET}], got {opset}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:  # torch.manual_seed's range, less the top bit export adds to
        raise ExportError(f"--seed must be in [0, 2**63), got {seed}")


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


def _weights(folder: Path) -> tuple[bool, str | None]:
    """(has safetensors weights, variant such as "fp16" when only that variant exists)."""
    files = [f.name for f in folder.iterdir()] if folder.is_dir() else []
    st = [f for f in files if f.endswith(".safetensors")]
    if any(f.count(".") == 1 for f in st):
        return True, None
    if st:
        return True, st[0].split(".")[-2]  # e.g. model.fp16.safetensors -> fp16
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    return False, (pickled[0].split(".")[-2] if pickled and pickled[0].count(".") > 1 else None)


def check_diffusers_folder(path: Path, allow_pickle: bool = False,
                           safety: bool = True) -> tuple[dict[str, str | None], bool]:
    """({component: weights variant or None}, load the safety checker?) for a diffusers folder."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ExportError(f"{path} is not a diffusers model (no model_index.json)")
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{index} is not valid JSON: {e}") from None
    missing = [d for d in REQUIRED if not (path / d).is_dir()]
    if missing:
        raise ExportError(f"{path} is not a Stable Diffusion v1.x diffusers model "
                          f"(missing {', '.join(missing)})")
    if not has_tokenizer(path / "tokenizer"):
        raise ExportError(f"{path / 'tokenizer'} has neither vocab.json + merges.txt nor tokenizer.json")
    entry = entries.get("safety_checker") if isinstance(entries, dict) else None
    use_checker = bool(safety and isinstance(entry, list) and entry and entry[0] is not None
                       and (path / "safety_checker").is_dir())
    variants = {}
    for d in ("text_encoder", "unet", "vae") + (("safety_checker",) if use_checker else ()):
        has_safetensors, variants[d] = _weights(path / d)
        if not has_safetensors and not allow_pickle:
            raise ExportError(f"{path / d} has only pickle weights (not safetensors); pass "
                              f"--allow-pickle if you trust this model")
    return variants, use_checker


def model_kind(model: str, allow_pickle: bool = False, safety: bool = True) -> str:
    """"built-in", "folder", "file" or "hub" for a --model value, or raise ExportError."""
    if model in BUILT_IN:
        return "built-in"
    path = Path(model).expanduser()
    if path.is_dir():
        check_diffusers_folder(path, allow_pickle, safety)
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

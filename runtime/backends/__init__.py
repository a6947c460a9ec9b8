"""Backends behind runtime.engine.Engine: tensorrt, ort-cuda, ort-cpu.

`pick(requested)` resolves `auto` to the best backend this machine can run and
says why; `open_engine` creates (but does not load) one graph's engine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from runtime.bundle import GraphEntry
from runtime.engine import Engine

BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu")


def _has_tensorrt() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "cuda"))


def _has_ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def available() -> list[str]:
    """Backends usable here, best first."""
    found = []
    if _has_tensorrt():
        found.append("tensorrt")
    if _has_ort_cuda():
        found.append("ort-cuda")
    return [*found, "ort-cpu"]


def pick(requested: str) -> tuple[str, str]:
    """(backend, why). Raises ValueError with one line when it cannot be used."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    have = available()
    if requested == "auto":
        missing = [b for b in ("tensorrt", "ort-cuda") if b not in have]
        why = f"auto; not available: {', '.join(missing)}" if missing else "auto"
        return have[0], why
    if requested not in have:
        hint = {"tensorrt": "install TensorRT and cuda-python (pip install '.[tensorrt]')",
                "ort-cuda": "install onnxruntime-gpu (pip install '.[ort-gpu]') on a CUDA machine"}
        raise ValueError(f"backend {requested} is not available here: {hint[requested]}")
    return requested, "requested"


def open_engine(backend: str, entry: GraphEntry, bundle: Path, use_cache: bool = True) -> Engine:
    """An unloaded engine for one bundle graph (`use_cache`: engine cache artifacts)."""
    path = Path(bundle) / entry.file
    if backend in ("ort-cpu", "ort-cuda"):
        from runtime import cache
        from runtime.backends.ort import OrtEngine, ort_cpu_key

        key = None
        if use_cache:
            key = ort_cpu_key(entry, path) if backend == "ort-cpu" else cache.ort_cuda_key(entry)
        return OrtEngine(entry.spec, path, backend, cache_key=key)
    raise ValueError(f"backend {backend} cannot open {entry.spec.name} yet")

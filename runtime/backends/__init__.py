"""Backends behind runtime.engine.Engine: tensorrt, ort-cuda, ort-cpu.

`candidates(requested)` lists the backends to try, best first, and says why;
`EngineSet` opens (and loads) the engines of one bundle on one backend, with the
state they share (TensorRT's device: stream + scratch), released in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from runtime.bundle import Manifest
from runtime.engine import Engine, EngineError

BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu")
HINTS = {"tensorrt": "install TensorRT and cuda-python (pip install '.[tensorrt]')",
         "ort-cuda": "install onnxruntime-gpu (pip install '.[ort-gpu]') on a CUDA machine"}


def unavailable(backend: str) -> str | None:
    """None when `backend` can run here, else why not (one line)."""
    if backend == "tensorrt":
        from runtime.backends.tensorrt import available

        return available()  # the real module, not type stubs; cuda-python importable
    if backend == "ort-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here"
    return None


def candidates(requested: str) -> tuple[list[str], str]:
    """(backends to try in order, why). ValueError with one line when none can run."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        why = unavailable(requested)
        if why:
            raise ValueError(f"backend {requested} is not available here ({why}): "
                             f"{HINTS[requested]}")
        return [requested], "requested"
    have = [b for b in ("tensorrt", "ort-cuda") if unavailable(b) is None]
    missing = [b for b in ("tensorrt", "ort-cuda") if b not in have]
    return [*have, "ort-cpu"], "auto" + (f"; not available: {', '.join(missing)}" if missing else "")


class EngineSet:
    """The loaded engines of one bundle on one backend (graph name -> Engine)."""

    def __init__(self, backend: str, manifest: Manifest, bundle: Path, names: Iterable[str],
                 use_cache: bool = True, on_load: Callable[[str, Engine, float], None] | None = None,
                 cuda_graph: bool = True):
        import time

        self.backend = backend
        self.cuda_graph = cuda_graph  # for the UNet, on backends that have them
        self.device = None  # TensorRT: one stream + scratch shared by all engines
        self.engines: dict[str, Engine] = {}
        try:
            for name in names:
                engine = self._open(name, manifest, Path(bundle), use_cache)
                t = time.perf_counter()
                engine.load()
                self.engines[name] = engine
                if on_load:
                    on_load(name, engine, time.perf_counter() - t)
        except BaseException:
            self.release()
            raise

    def _open(self, name: str, manifest: Manifest, bundle: Path, use_cache: bool) -> Engine:
        entry = manifest.graphs[name]
        path = bundle / entry.file
        if self.backend == "tensorrt":
            from runtime.backends.tensorrt import CachedTensorRTEngine, TensorRTDevice

            if self.device is None:
                try:
                    self.device = TensorRTDevice()
                except RuntimeError as e:  # CudaError: no driver, no GPU
                    raise EngineError(f"tensorrt: cannot start CUDA: {e}") from None
            # CUDA graphs pay off for the UNet: 51 identical launches per image.
            return CachedTensorRTEngine(entry, manifest.profile, self.device,
                                        cuda_graph=self.cuda_graph and name == "unet")
        from runtime import cache
        from runtime.backends.ort import OrtEngine, ort_cpu_key

        key = None
        if use_cache:
            key = ort_cpu_key(entry, path) if self.backend == "ort-cpu" else cache.ort_cuda_key(entry)
        return OrtEngine(entry.spec, path, self.backend, cache_key=key,
                         cuda_graph=self.cuda_graph and name == "unet")

    def release(self) -> None:
        """Engines first, then what they share."""
        for e in self.engines.values():
            e.release()
        self.engines = {}
        if self.device is not None:
            self.device.release()
            self.device = None

"""Backends behind runtime.engine.Engine: tensorrt, ort-cuda, openvino, ort-cpu.

`candidates(requested)` lists the backends to try, best first, and says why;
`resolve_precision` turns `auto` into what a backend runs (and refuses what it cannot);
`EngineSet` opens (and loads) the engines of one bundle on one backend, with the
state they share (TensorRT's device: stream + scratch), released in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

from runtime import cpu
from runtime.bundle import GraphEntry, Manifest, verify_hashes
from runtime.engine import Engine, EngineError

BACKENDS = ("auto", "tensorrt", "ort-cuda", "openvino", "ort-cpu")
HINTS = {"tensorrt": "install TensorRT and cuda-python (pip install '.[tensorrt]')",
         "ort-cuda": "install onnxruntime-gpu (pip install '.[ort-gpu]') on a CUDA machine",
         "openvino": "install OpenVINO (pip install '.[openvino]')"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# what each backend runs; the first is its `auto` unless resolve_precision says otherwise
BACKEND_PRECISIONS = {"tensorrt": ("fp16",), "ort-cuda": ("fp16",), "ort-cpu": ("fp32",),
                      "openvino": ("fp32", "bf16")}
# graphs that run in the reduced CPU precision; the text encoder and safety checker stay
# fp32 (a few % of the work, and the safety decision should not move)
BF16_GRAPHS = ("unet", "vae_decoder")


def unavailable(backend: str) -> str | None:
    """None when `backend` can run here, else why not (one line)."""
    if backend == "tensorrt":
        from runtime.tensorrt_env import available

        return available()  # the real module, not type stubs; cuda-python importable
    if backend == "ort-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here"
    if backend == "openvino":
        from runtime.backends.openvino import version

        if version() is None:
            return "OpenVINO is not installed"
    return None


def resolve_precision(backend: str, precision: str) -> tuple[str, str]:
    """(precision the backend runs, why). ValueError with one line when it cannot run
    the one asked for. `auto`: bf16 on OpenVINO where the CPU has bf16 matrix units,
    fp32 on other CPUs, fp16 on GPUs."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    have = BACKEND_PRECISIONS[backend]
    if precision == "auto":
        if backend == "openvino":
            if cpu.has_bf16():
                return "bf16", "auto: the CPU has " + "/".join(sorted(cpu.bf16_flags()))
            return "fp32", "auto: the CPU has no bf16 matrix units"
        return have[0], "auto"
    if precision not in have:
        raise ValueError(f"backend {backend} runs {'/'.join(have)}, not {precision}"
                         + ("; bf16 runs on --backend openvino" if precision == "bf16" else ""))
    if precision == "bf16":
        if not cpu.has_bf16():  # OpenVINO would run fp32 (AVX2) or emulate bf16 slowly
            raise ValueError("this CPU has no bf16 units (avx512_bf16 / amx_bf16 in "
                             "/proc/cpuinfo); use --precision fp32 (or auto)")
    return precision, "requested"


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
    better = ("tensorrt", "ort-cuda", "openvino")
    have = [b for b in better if unavailable(b) is None]
    missing = [b for b in better if b not in have]
    return [*have, "ort-cpu"], "auto" + (f"; not available: {', '.join(missing)}" if missing else "")


def for_run_time_weights() -> str:
    """What `auto` runs with run-time LoRAs and embeddings: ort-cuda where it can run
    (they swap in place there), else ort-cpu (in place too; OpenVINO recompiles at each
    swap and TensorRT needs refittable plans, so auto leaves them for the user to ask)."""
    return "ort-cuda" if unavailable("ort-cuda") is None else "ort-cpu"


def give_back_freed_memory() -> None:
    """glibc keeps freed heap for reuse; after a session is swapped out (LoRA), hand it back
    to the OS, or RSS grows by the weights changed at every swap (measured: +0.6 GiB per
    full-size UNet swap without, none with). Elsewhere (musl, macOS): nothing to do."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class EngineSet:
    """The loaded engines of one bundle on one backend (graph name -> Engine)."""

    def __init__(self, backend: str, manifest: Manifest, bundle: Path, names: Iterable[str],
                 use_cache: bool = True, on_load: Callable[[str, Engine, float], None] | None = None,
                 cuda_graph: bool = True, precision: str = "fp32"):
        self.backend = backend
        self.use_cache = use_cache
        self.cuda_graph = cuda_graph  # for the UNet, on backends that have them
        self.precision = precision  # resolved (resolve_precision); CPU: BF16_GRAPHS only
        self.device = None  # TensorRT: one stream + scratch shared by all engines
        self.engines: dict[str, Engine] = {}
        try:
            for name in names:
                self.add(name, manifest, bundle, on_load)
        except BaseException:
            self.release()
            raise

    def add(self, name: str, manifest: Manifest, bundle: Path,
            on_load: Callable[[str, Engine, float], None] | None = None) -> Engine:
        """Open and load graph `name` (at construction, or later: a graph used by some
        requests only); on failure nothing of it stays."""
        import time

        engine = self._open(name, manifest, Path(bundle), self.use_cache)
        t = time.perf_counter()
        try:
            engine.load()
        except BaseException:
            engine.release()  # whatever it got before failing
            raise
        self.engines[name] = engine
        if on_load:
            on_load(name, engine, time.perf_counter() - t)
        return engine

    def _open(self, name: str, manifest: Manifest, bundle: Path, use_cache: bool) -> Engine:
        entry = manifest.graphs[name]
        path = bundle / entry.file
        if self.backend == "tensorrt":
            from runtime.backends.tensorrt import TensorRTDevice
            from runtime.backends.tensorrt_cached import CachedTensorRTEngine

            if self.device is None:
                try:
                    self.device = TensorRTDevice()
                except RuntimeError as e:  # CudaError: no driver, no GPU
                    raise EngineError(f"tensorrt: cannot start CUDA: {e}") from None
            # CUDA graphs pay off for the UNet: 51 identical launches per image.
            return CachedTensorRTEngine(entry, manifest.profile, self.device,
                                        cuda_graph=self.cuda_graph and name == "unet")
        if self.backend == "openvino":
            return self._openvino(entry, path, manifest)
        from runtime import cache
        from runtime.backends.ort import OrtEngine

        key, fused, damaged = None, None, None
        if use_cache and self.backend == "ort-cpu":
            # engines.build --backend ort-cpu's graph with the CPU fusions, when built
            with contextlib.suppress(OSError):  # an unreadable cache: the bundle's graph
                fused, damaged = cache.find(cache.ort_cpu_fused_key(entry))
            key = cache.ort_cpu_key(entry, fused=fused is not None)
        elif use_cache:
            key = cache.ort_cuda_key(entry)
        engine = OrtEngine(entry.spec, path, self.backend, cache_key=key,
                           cuda_graph=self.cuda_graph and name == "unet", source=fused,
                           check_source=None if fused else self._check_source(bundle, manifest, name))
        if damaged:  # the bundle's graph runs instead; say how to get the fusions back
            engine.cache_note = ("; the CPU-fused graph is damaged: rebuild it with "
                                 "engines.build --backend ort-cpu --force")
        return engine

    def replace_weights(self, name: str, manifest: Manifest, bundle: Path,
                        weights: dict | None,
                        on_load: Callable[[str, Engine, float], None] | None = None,
                        in_place: bool = False) -> Engine:
        """Graph `name` running `weights` (initializer -> array: LoRA), or its own again
        with None. ort-cpu or ort-cuda: a session from the cached LoRA-ready graph, whose
        mapped weights are inputs (cache.ort_cpu_lora_key / ort_cuda_lora_key, fp32): a new
        engine takes every mapped weight (and keeps the arrays); `in_place` writes some of
        them into the loaded LoRA-ready engine instead (a swap: no new session). The old engine goes first, so
        two copies of a UNet's weights are never held at once."""
        if self.backend not in ("ort-cpu", "ort-cuda") or not self.use_cache:
            raise ValueError("run-time LoRA weights need the ort-cpu or ort-cuda backend with "
                             "the engine cache on")
        if in_place:
            if weights is None:
                raise ValueError("in_place needs weights; None reloads the bundle's own engine")
            engine = self.engines[name]
            engine.set_weights(weights)  # type: ignore[attr-defined]
            return engine
        self.drop(name)
        if weights is None:
            return self.add(name, manifest, bundle, on_load)
        import time

        from runtime import cache
        from runtime.backends.ort import OrtEngine

        entry = manifest.graphs[name]
        cuda = self.backend == "ort-cuda"  # the fp32 graph on the GPU, weights there too
        # no CUDA graph: ORT leaves some of the fp32 graph's nodes off the GPU, so capture
        # fails (measured on an H100) and would cost a second session start each load
        engine = OrtEngine(entry.spec, Path(bundle) / entry.file, self.backend,
                           cache_key=(cache.ort_cuda_lora_key if cuda else cache.ort_cpu_lora_key)(entry),
                           weights=weights,
                           check_source=self._check_source(Path(bundle), manifest, name))
        t = time.perf_counter()
        try:
            engine.load()
        except BaseException:
            engine.release()
            raise
        self.engines[name] = engine
        give_back_freed_memory()  # the session's start-up copies
        if on_load:
            on_load(name, engine, time.perf_counter() - t)
        return engine

    def drop(self, name: str) -> None:
        """Release graph `name`'s engine, if loaded, and hand its memory back (before
        another copy of its weights is made)."""
        old = self.engines.pop(name, None)
        if old is not None:
            old.release()
            give_back_freed_memory()

    @staticmethod
    def _check_source(bundle: Path, manifest: Manifest, name: str) -> Callable[[], None]:
        """What an engine calls before it builds a cached artifact from the bundle's
        graph: hash the graph and its external data against the manifest (BundleError),
        so no artifact is ever made from a damaged file (their keys trust the hashes)."""
        return lambda: verify_hashes(bundle, manifest, only=name)

    def graph_precision(self, name: str) -> str:
        return self.precision if self.precision != "bf16" or name in BF16_GRAPHS else "fp32"

    def _openvino(self, entry: GraphEntry, path: Path, manifest: Manifest) -> Engine:
        """An OpenVINO engine compiled at load for the manifest's default shapes (one
        CFG image), so a graph OpenVINO cannot compile fails here, where `auto` can
        still fall back, and the first image does not wait for the compiler."""
        from runtime.backends.openvino import OpenVinoEngine

        name = entry.spec.name
        # opt: one image with guidance (the text encoder: prompt and negative prompt)
        warm = {k: tuple(row["opt"]) for k, row in manifest.profile.shapes(entry.spec).items()}
        key = None
        if self.use_cache and self.graph_precision(name) == "bf16":
            from runtime import cache
            from runtime.backends.openvino import version

            key = cache.openvino_key(entry, version() or "?")
        return OpenVinoEngine(entry.spec, path, self.graph_precision(name), warm_shapes=warm,
                              cache_key=key, check_source=self._check_source(
                                  path.parent, manifest, name))

    def release(self) -> None:
        """Engines first, then what they share."""
        for e in self.engines.values():
            e.release()
        self.engines = {}
        if self.device is not None:
            self.device.release()
            self.device = None

"""Statistics, memory probes and the instruments the workers put around a pipeline.

Nothing here changes what a pipeline computes: `TimedEngine` wraps one of our engines
(delegating everything) to time each run() and keep a copy of an output; `StepClock`
is the progress callback that timestamps the end of every denoising step.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def stats(samples: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/min/mean of seconds (numpy's linear percentiles) and the sample count."""
    a = np.asarray(samples, np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "mean": float(a.mean()), "n": int(a.size)}


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc), or None."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def rss_split() -> dict[str, int | None]:
    """Resident memory now, split: allocated (RssAnon) and mapped files (RssFile, e.g.
    weights mapped from the bundle: clean page cache the kernel can drop)."""
    return {k: (None if (kb := _status_kb(f)) is None else kb * 1024)
            for k, f in (("anon", "RssAnon"), ("file", "RssFile"))}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM, else getrusage)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # ru_maxrss is KiB on Linux
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits_in_memory(rss_loaded: int, peak_batch1: int, batch: int, margin: float = 0.8) -> tuple[bool, str]:
    """Whether a run at `batch` should fit: activations assumed linear in the batch."""
    now, avail = rss_bytes(), mem_available_bytes()
    if now is None or avail is None:
        return True, "no /proc: not checked"
    need = rss_loaded + (peak_batch1 - rss_loaded) * batch - now
    ok = need <= margin * avail
    return ok, f"needs about {need / 2**30:.1f} GiB more, {avail / 2**30:.1f} GiB available"


class StepClock:
    """Progress callback `(i, calls)`: records when each denoising step ended."""

    def __init__(self, on_step: Any = None):
        self.ends: list[float] = []
        self.on_step = on_step

    def reset(self) -> None:
        self.ends = []

    def __call__(self, i: int, calls: int) -> None:
        self.ends.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step(i, calls)


def steady_host_overhead(step_ends: Sequence[float], unet_calls: Sequence[float]) -> list[float]:
    """Per step after the first: wall time between step ends minus that step's UNet time.

    The first step is left out: its interval starts before the loop (schedule, latents,
    buffer allocation), which the loop-level figure (denoise - unet) / calls includes.
    """
    out = []
    for i in range(1, min(len(step_ends), len(unet_calls))):
        out.append(step_ends[i] - step_ends[i - 1] - unet_calls[i])
    return out


class TimedEngine:
    """Wraps a runtime Engine: times each run() (host clock, or CUDA events on the
    engine's stream where it exposes one) and optionally keeps a copy of one output."""

    def __init__(self, engine: Any, keep: str | None = None):
        self._engine = engine
        self._keep = keep
        self.calls: list[float] = []
        self.kept: np.ndarray | None = None
        self._events = CudaEventTimer.for_engine(engine)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._events is not None:
            self._events.start()
        t = time.perf_counter()
        out = self._engine.run(feeds)
        host = time.perf_counter() - t
        self.calls.append(self._events.stop() if self._events is not None else host)
        if self._keep is not None:
            self.kept = np.array(out[self._keep], copy=True)
        return out


class CudaEventTimer:
    """CUDA events recorded on a TensorRT engine's stream around one run.

    UNTESTED here (no GPU in the session that wrote it). Our engines synchronize their
    stream at the end of run(), so stop() can read the elapsed time at once. ORT CUDA
    owns its stream, so ort-cuda is timed on the host around its synchronous run.
    """

    def __init__(self, cuda: Any, stream: Any):
        self.cuda, self.stream = cuda, stream
        self.begin = cuda.call("cudaEventCreate")
        self.end = cuda.call("cudaEventCreate")

    @staticmethod
    def for_engine(engine: Any) -> CudaEventTimer | None:
        device = getattr(engine, "device", None)
        cuda, stream = getattr(device, "cuda", None), getattr(device, "stream", None)
        if cuda is None or stream is None or os.environ.get("SDRT_BENCH_HOST_CLOCK"):
            return None
        try:
            return CudaEventTimer(cuda, stream)
        except Exception:  # an old cuda-python without events: fall back to the host clock
            return None

    def start(self) -> None:
        self.cuda.call("cudaEventRecord", self.begin, self.stream)

    def stop(self) -> float:
        self.cuda.call("cudaEventRecord", self.end, self.stream)
        self.cuda.call("cudaEventSynchronize", self.end)
        return float(self.cuda.call("cudaEventElapsedTime", self.begin, self.end)) / 1e3

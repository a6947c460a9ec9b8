"""Statistics, memory probes and the instruments the workers put around a pipeline.

Nothing here changes what a pipeline computes. Our pipeline reports its own per-call
and per-step times (runtime.pipeline.Result); `StepClock` is the progress callback that
timestamps the end of every denoising step of the diffusers baseline and shows progress.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
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

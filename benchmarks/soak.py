"""`python -m benchmarks.soak`: N generations in one process with one loaded Pipeline; does RSS grow?

Loads the bundle once, runs --warmup generations first (allocator arenas, engine buffers
and the runtimes' own caches grow in the first calls: that is not a leak), reads the
resident set size (VmRSS) as the baseline, then runs --n generations, each with its own
seed and prompt, reading RSS every --every generations. Reports the baseline, final and
largest RSS, the growth (final vs baseline) and a least-squares slope per 1,000
generations: a slow steady leak shows in the slope where noise hides it in the two end
points. Exits 1 when the growth or the fitted growth over the run (slope x generations)
is above --max-growth percent, so it can gate (issue 12: 1,000 at 64x64 stay under 1%).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks import machine
from benchmarks.settings import resolve
from benchmarks.timing import peak_rss_bytes, rss_bytes, rss_split
from runtime.backends import BACKENDS, PRECISIONS

# cycled and numbered per generation, so no two calls tokenize the same text
PROMPTS = ("a photograph of an astronaut riding a horse", "a red apple on a wooden table",
           "a lighthouse at dusk, oil painting", "a cat wearing a tiny hat")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="demo | sd14-random | bundle folder")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--n", type=int, default=1000, help="measured generations, after the warmup")
    p.add_argument("--warmup", type=int, default=20,
                   help="generations before the baseline RSS is read (default 20)")
    p.add_argument("--size", type=int, default=64, help="height and width (default 64)")
    # The denoising loop allocates nothing (runtime.pipeline), so what could leak is per
    # call (request, schedule, text encoder, VAE, safety checker, engine I/O): few steps
    # give more calls per minute. Raise it to soak the per-step paths harder.
    p.add_argument("--steps", type=int, default=2, help="per generation (default 2; see the source)")
    p.add_argument("--scheduler", default="pndm")
    p.add_argument("--seed", type=int, default=0, help="generation i uses seed + i")
    p.add_argument("--every", type=int, default=10, help="read RSS every this many generations")
    p.add_argument("--max-growth", type=float, default=1.0, help="percent (default 1.0)")
    p.add_argument("--json", type=Path, help="write the samples and summary here")
    a = p.parse_args(argv)
    if a.n < 1 or a.warmup < 0 or a.every < 1 or a.steps < 1 or not a.max_growth >= 0:
        p.error("--n, --every and --steps must be >= 1, --warmup and --max-growth >= 0")
    return a


def prompt_for(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]}, number {i}"


def summarize(gens: Sequence[int], rss: Sequence[int], seconds: float) -> dict:
    """RSS samples [S] (bytes) read after gens[k] measured generations; gens[0] == 0 is the
    baseline. The slope is an ordinary least-squares line through all samples."""
    g, r = np.asarray(gens, np.float64), np.asarray(rss, np.float64)
    base, n = float(r[0]), int(g[-1])
    slope = float(np.polyfit(g, r, 1)[0]) if len(g) > 1 and np.ptp(g) > 0 else 0.0  # bytes/gen
    return {"generations": n, "samples": len(g), "seconds": seconds,
            "generations_per_s": n / seconds if seconds > 0 else None,
            "baseline_rss": int(r[0]), "final_rss": int(r[-1]), "max_rss": int(r.max()),
            "growth_pct": 100 * (r[-1] - base) / base,
            "slope_bytes_per_1000": 1000 * slope, "slope_pct_per_1000": 100 * 1000 * slope / base,
            "fitted_growth_pct": 100 * slope * n / base}


def verdict(summary: dict, max_growth: float) -> tuple[bool, str]:
    """(passed, one line): fails when the end-point or the fitted growth is over the limit."""
    s = summary
    over = [f"{what} {s[k]:+.3f}%" for k, what in (("growth_pct", "end-point growth"),
                                                   ("fitted_growth_pct", "fitted growth"))
            if s[k] > max_growth]
    ok = not over
    return ok, (f"{'PASS' if ok else 'FAIL'}: RSS {s['growth_pct']:+.3f}% (fitted "
                f"{s['fitted_growth_pct']:+.3f}%) over {s['generations']} generations; limit "
                f"{max_growth:g}%" + ("" if ok else f" ({', '.join(over)} over it)"))


def mib(v: float) -> str:
    return f"{v / 2**20:.1f} MiB"


def reporter(n: int, every: int) -> tuple[Callable[[int, int, int], None], Callable[[], None]]:
    """Progress: a tqdm bar on a terminal, else a line about every tenth of the run."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=n, desc="soak", unit="gen", file=sys.stderr)

        def update(done: int, rss: int, base: int) -> None:
            bar.set_postfix_str(f"RSS {mib(rss)} ({100 * (rss - base) / base:+.2f}%)", refresh=False)
            bar.update(done - bar.n)

        return update, bar.close
    step = max(every, n // 10)
    last = [0]

    def line(done: int, rss: int, base: int) -> None:
        if done - last[0] >= step or done == n:
            last[0] = done
            print(f"soak: {done}/{n} generations, RSS {mib(rss)} ({100 * (rss - base) / base:+.3f}%)",
                  file=sys.stderr, flush=True)

    return line, lambda: None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from runtime.bundle import BundleError
    from runtime.engine import EngineError
    from runtime.pipeline import Pipeline, StageError, UsageError

    if rss_bytes() is None:
        print("error: no /proc/self/status here: RSS cannot be read", file=sys.stderr)
        return 2
    info = machine.info()
    print(f"soak: {a.model}, {a.size}x{a.size}, {a.scheduler} {a.steps} steps, {a.warmup} warmup + "
          f"{a.n} generations on {info['cpu']}", file=sys.stderr, flush=True)
    gens: list[int] = []
    rss: list[int] = []
    times: list[float] = []  # seconds since the baseline, per sample: a slowdown shows too
    try:
        with Pipeline(resolve(a.model), a.backend, precision=a.precision) as pipe:
            print(f"soak: backend {pipe.backend} {pipe.precision}, loaded in {pipe.load_seconds:.2f} s",
                  file=sys.stderr, flush=True)
            kw = {"steps": a.steps, "scheduler": a.scheduler, "height": a.size, "width": a.size}
            for i in range(a.warmup):
                pipe(prompt_for(i), seed=a.seed + i, **kw)
            split_before = rss_split()
            gens.append(0)
            rss.append(rss_bytes() or 0)
            gpu_before = machine.gpu_memory_used_by(os.getpid()) if info["gpus"] else None
            update, close = reporter(a.n, a.every)
            t0 = time.perf_counter()
            times.append(0.0)
            try:
                for j in range(1, a.n + 1):
                    i = a.warmup + j - 1
                    pipe(prompt_for(i), seed=a.seed + i, **kw)
                    if j % a.every == 0 or j == a.n:
                        gens.append(j)
                        rss.append(rss_bytes() or 0)
                        times.append(time.perf_counter() - t0)
                        update(j, rss[-1], rss[0])
            finally:
                close()
            seconds = time.perf_counter() - t0
            split_after = rss_split()  # before close() releases the engines
            gpu_after = machine.gpu_memory_used_by(os.getpid()) if info["gpus"] else None
            backend, precision = pipe.backend, pipe.precision
    except (UsageError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StageError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = summarize(gens, rss, seconds)
    ok, line = verdict(s, a.max_growth)
    result = {
        "schema": 1, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.soak " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": info, "backend": backend, "precision": precision,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        # VmHWM lags VmRSS (the kernel syncs per-thread RSS counters lazily): max of both
        "summary": s, "passed": ok, "verdict": line, "peak_rss": max(peak_rss_bytes(), s["max_rss"]),
        "rss_split": {"baseline": split_before, "final": split_after},
        "gpu_memory": {"baseline": gpu_before, "final": gpu_after},  # nvidia-smi; untested
        "samples": {"generations": gens, "rss": rss, "seconds": times},
    }
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores" + "".join(
        f"; {g['name']}" for g in info["gpus"]))
    print(f"backend: {backend} {precision}; {a.size}x{a.size}, {a.scheduler} {a.steps} steps, "
          f"{a.warmup} warmup + {s['generations']} measured generations in {seconds:.1f} s "
          f"({s['generations_per_s']:.1f}/s)")
    print(f"RSS: baseline {mib(s['baseline_rss'])}, final {mib(s['final_rss'])}, max "
          f"{mib(s['max_rss'])} (process peak {mib(result['peak_rss'])}); growth "
          f"{s['growth_pct']:+.3f}%, slope {s['slope_bytes_per_1000'] / 2**10:+.1f} KiB "
          f"({s['slope_pct_per_1000']:+.3f}%) per 1,000 generations")
    change = {k: after - before for k in ("anon", "file")
              if (before := split_before[k]) is not None and (after := split_after[k]) is not None}
    if change:
        print("RSS change by kind: " + ", ".join(f"{k} {v / 2**10:+.0f} KiB" for k, v in change.items())
              + " (anon: allocated; file: mapped files such as code, paged in)")
    if gpu_before is not None and gpu_after is not None:
        print(f"GPU memory (nvidia-smi): {mib(gpu_before)} -> {mib(gpu_after)}")
    print(line)
    if a.json:
        from runtime.files import write_atomic

        write_atomic(a.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

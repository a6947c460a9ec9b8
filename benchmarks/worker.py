"""One side of a benchmark in its own process, so its memory and cold start are its own.

    python -m benchmarks.worker ours|diffusers|build SETTINGS_JSON OUT_JSON SPAWNED_AT

`ours` imports only the runtime (no torch); `diffusers` only the baseline. Each writes
OUT_JSON after every phase (atomically), so a worker killed for memory in a late
phase still leaves its earlier figures. Progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.settings import Settings, resolve
from benchmarks.timing import (
    StepClock,
    fits_in_memory,
    peak_rss_bytes,
    rss_bytes,
    rss_split,
    stats,
    steady_host_overhead,
)
from runtime.args import first_line
from runtime.files import write_atomic

STAGES = ("text_encoder", "unet_step", "denoise", "host_overhead_step", "loop_overhead_step",
          "vae_decoder", "safety_checker", "total")


def say(side: str, msg: str, end: str = "\n") -> None:
    print(f"[{side}] {msg}", end=end, file=sys.stderr, flush=True)


def progress(side: str, label: str) -> StepClock:
    """A StepClock that shows the step count: in place on a terminal, else every 10 s."""
    tty, last = sys.stderr.isatty(), [time.perf_counter()]

    def show(i: int, calls: int) -> None:
        now = time.perf_counter()
        if tty:
            say(side, f"{label}: step {i}/{calls}", end="\r" if i < calls else "\n")
        elif now - last[0] > 10 or (i == calls and now - last[0] > 10):
            say(side, f"{label}: step {i}/{calls}")
            last[0] = now

    return StepClock(show)


class Ours:
    name = "ours"

    def __init__(self, s: Settings, bundle: Path):
        from runtime.pipeline import Pipeline

        self.s = s
        self.pipe = Pipeline(bundle, s.backend, safety=s.safety, cuda_graph=s.cuda_graph,
                             precision=s.precision, log=lambda m: say("ours", m))
        self.load_seconds = self.pipe.load_seconds
        self.where = {"bundle": str(bundle), "backend": self.pipe.backend,
                      "precision": self.pipe.precision}
        self.not_cold = 0.0

    def generate(self, batch: int, clock: StepClock) -> dict:
        clock.reset()
        # the pipeline's own timings: each UNet call (engine.run, host clock; every engine
        # synchronizes its stream before returning) and each step's end
        r = self.pipe(self.s.prompt, self.s.negative_prompt, progress=clock, keep_decoded=True,
                      safety=self.s.safety, **self.s.call_kwargs(batch))
        return {"timings": dict(r.timings), "unet_calls": r.unet_calls.tolist(),
                "step_ends": r.step_ends.tolist(), "images": r.decoded, "nsfw": list(r.nsfw)}


class Diffusers:
    name = "diffusers"

    def __init__(self, s: Settings, bundle: Path):
        from benchmarks import baseline_diffusers as bd
        from runtime.bundle import read_manifest

        t = time.perf_counter()
        manifest = read_manifest(bundle)
        pipe, self.where = bd.load_pipeline(bundle, manifest, s.scheduler, s.baseline_device,
                                            s.baseline_dtype, s.safety, s.compile)
        # the weight-hash check is not part of loading; it runs before the first image,
        # so it is taken out of the cold start too (main)
        self.load_seconds = time.perf_counter() - t - self.where["hash_seconds"]
        self.not_cold = self.where["hash_seconds"]
        say("diffusers", f"weights: {self.where}; loaded in {self.load_seconds:.2f} s")
        self.s, self.bd = s, bd
        self.inst = bd.Instrumented(pipe, s.baseline_device)
        self.safety = pipe.safety_checker is not None

    def generate(self, batch: int, clock: StepClock) -> dict:
        clock.reset()
        out = self.inst.generate(self.s.prompt, self.s.negative_prompt, self.s.call_kwargs(batch),
                                 on_step=clock.on_step)
        d = self.bd.stage_times(out["marks"], out["total"], self.safety)
        return {**d, "images": out["images"], "nsfw": out["nsfw"]}


def summarize(runs: list[dict]) -> dict:
    """Per-stage statistics over timed runs (UNet calls and host overheads pooled)."""
    pooled: dict[str, list[float]] = {k: [] for k in STAGES}
    for r in runs:
        t, calls = r["timings"], r["unet_calls"]
        for k in ("text_encoder", "denoise", "vae_decoder", "safety_checker", "total"):
            if k in t:
                pooled[k].append(t[k])
        pooled["unet_step"] += calls
        pooled["loop_overhead_step"].append((t["denoise"] - t["unet"]) / max(1, len(calls)))
        pooled["host_overhead_step"] += steady_host_overhead(r["step_ends"], calls)
    return {k: stats(v) for k, v in pooled.items() if v}


BOOKKEEPING_BYTES = 4096  # what a step's numpy/ORT/interpreter calls churn stays below


def alloc_probe(side: Any, s: Settings, batch: int) -> dict:
    """What numpy/Python allocate inside each denoising step, via tracemalloc (an untimed
    extra run; steps after the first; native arenas of ORT/OpenVINO are not seen).

    `bytes_per_step_*`: the per-step peak over the step's start, everything traced:
    besides arrays, the interpreter's and the libraries' bookkeeping (a numpy call or an
    ORT run creates and frees objects of a few hundred bytes, about 1 KiB per step in
    all). `array_bytes_per_step_max` counts that peak as array allocations when it
    reaches BOOKKEEPING_BYTES, else 0: the zero-allocation target is about arrays (the
    loop's are latent-sized, 64 KiB at 512x512). When one latent [B, 4, h, w] float32
    is smaller than that (tiny test sizes) the two cannot be told apart: None."""
    per_step: list[int] = []

    def on_step(i: int, calls: int) -> None:
        cur, peak = tracemalloc.get_traced_memory()
        per_step.append(peak - base[0])
        tracemalloc.reset_peak()
        base[0] = tracemalloc.get_traced_memory()[0]

    base = [0]
    tracemalloc.start()
    try:
        base[0] = tracemalloc.get_traced_memory()[0]
        side.generate(batch, StepClock(on_step))
    finally:
        tracemalloc.stop()
    steady = per_step[1:] or per_step
    latent = batch * 4 * (s.height // 8) * (s.width // 8) * 4
    worst = max(steady)
    arrays = None if latent < BOOKKEEPING_BYTES else int(worst) if worst >= BOOKKEEPING_BYTES else 0
    return {"bytes_per_step_p50": int(np.median(steady)), "bytes_per_step_max": int(worst),
            "array_bytes_per_step_max": arrays,
            "latent_bytes": latent, "steps": len(per_step)}


def main(argv: list[str]) -> int:
    which, settings_json, out_path, spawned_at = argv[0], argv[1], Path(argv[2]), float(argv[3])
    s = Settings.from_json(settings_json)
    result: dict[str, Any] = {"side": which, "pid": os.getpid()}

    def save() -> None:
        write_atomic(out_path, json.dumps(result, indent=1))

    bundle = resolve(s.model)
    if which == "build":
        from benchmarks.build import build

        result.update(build(s, bundle, lambda m: say("build", m)))
        save()
        return 0
    side = Ours(s, bundle) if which == "ours" else Diffusers(s, bundle)
    result.update(load_seconds=side.load_seconds, weights=side.where, rss_after_load=rss_bytes())
    save()
    runs = []
    for i in range(s.warmup + s.runs):
        label = f"warm-up {i + 1}/{s.warmup}" if i < s.warmup else f"run {i - s.warmup + 1}/{s.runs}"
        r = side.generate(s.batch_size, progress(which, label))
        if i == 0:  # the first image of a fresh process: cold start
            result["cold_start_seconds"] = time.time() - spawned_at - side.not_cold
            result["first_image_seconds"] = r["timings"]["total"]
            np.save(out_path.with_suffix(".images.npy"), r["images"])
            result.update(nsfw=r["nsfw"], unet_calls_per_image=len(r["unet_calls"]))
        say(which, f"{label}: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["timings"].items()))
        if i >= s.warmup:
            runs.append({k: r[k] for k in ("timings", "unet_calls", "step_ends")})
    result.update(stages=summarize(runs), runs=runs, peak_rss=peak_rss_bytes(),
                  rss_after_runs=rss_split())
    save()
    if which == "ours" and s.alloc_probe:
        say(which, "allocation probe (tracemalloc, untimed)")
        result["alloc"] = alloc_probe(side, s, s.batch_size)
        save()
    throughput(side, s, result, save)
    if s.baseline_device == "cuda" and which == "diffusers":  # UNTESTED here
        import torch

        result["peak_device_memory"] = int(torch.cuda.max_memory_allocated())
    elif which == "ours" and s.backend != "ort-cpu":  # UNTESTED here
        from benchmarks.machine import gpu_memory_used_by

        result["peak_device_memory"] = gpu_memory_used_by(os.getpid())
    result["peak_rss_all"] = peak_rss_bytes()
    save()
    return 0


def throughput(side: Any, s: Settings, result: dict, save: Any) -> None:
    """Images per second at each batch size (total time per call), where memory allows."""
    tp: dict[str, dict] = {}
    result["throughput"] = tp
    base_total = result["stages"]["total"]["p50"]
    for b in s.throughput_batches:
        if b == s.batch_size:
            tp[str(b)] = {"images_per_s": b / base_total, "total": result["stages"]["total"]}
            continue
        ok, why = fits_in_memory(result["rss_after_load"] or 0, result["peak_rss"], b / s.batch_size)
        if not ok:
            tp[str(b)] = {"skipped": f"memory: {why}"}
            say(side.name, f"throughput batch {b}: skipped ({why})")
            save()
            continue
        totals = []
        try:
            for i in range(s.throughput_warmup + s.throughput_runs):
                label = f"batch {b} " + ("warm-up" if i < s.throughput_warmup else "run")
                r = side.generate(b, progress(side.name, label))
                say(side.name, f"{label}: total {r['timings']['total']:.3f} s")
                if i >= s.throughput_warmup:
                    totals.append(r["timings"]["total"])
        except Exception as e:  # an engine profile or allocation limit: report it, go on
            tp[str(b)] = {"skipped": f"{type(e).__name__}: {first_line(e)[:200]}"}
            save()
            continue
        st = stats(totals)
        tp[str(b)] = {"images_per_s": b / st["p50"], "total": st, "peak_rss": peak_rss_bytes()}
        save()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m benchmarks.run`: our runtime vs diffusers, stage by stage, on this machine.

Runs, one after another, each in its own process (so memory and cold start are each
side's own): an engine build into an empty temporary engine cache, our pipeline
(warm cache), then diffusers' StableDiffusionPipeline on the same weights, prompt,
seed and settings. Writes RESULTS/<model>-<backend>-<WxH>-<steps>steps-<machine>.json
(every figure and the machine), .md (the table) and .png (per-stage bar chart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import machine, report
from benchmarks.settings import Settings, resolve

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=d.model, help="demo | sd14-random | bundle folder")
    p.add_argument("--backend", default=d.backend,
                   choices=("ort-cpu", "openvino", "ort-cuda", "tensorrt"),
                   help="ours (ort-cuda / tensorrt: written, untested on a GPU yet)")
    p.add_argument("--prompt", default=d.prompt)
    p.add_argument("--negative-prompt", default=d.negative_prompt)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--scheduler", default=d.scheduler)
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs first (the first "
                   "one is also the cold start)")
    p.add_argument("--runs", type=int, default=d.runs, help="timed runs")
    p.add_argument("--throughput-batches", default="1,2,4", help="comma-separated; '' for none")
    p.add_argument("--throughput-warmup", type=int, default=d.throughput_warmup)
    p.add_argument("--throughput-runs", type=int, default=d.throughput_runs)
    p.add_argument("--no-safety", action="store_true", help="both sides without the safety checker")
    p.add_argument("--no-alloc-probe", action="store_true", help="skip the tracemalloc run")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="ours: run the UNet kernel by kernel instead of replaying a CUDA graph")
    p.add_argument("--precision", default=d.precision, choices=("auto", "fp32", "bf16", "fp16"),
                   help="ours (see python -m runtime.generate --help)")
    p.add_argument("--no-build", action="store_true",
                   help="skip the engine build; use the default engine cache as it is")
    p.add_argument("--no-baseline", action="store_true", help="ours only")
    p.add_argument("--baseline-device", default=d.baseline_device, choices=("cpu", "cuda"))
    p.add_argument("--baseline-dtype", default=d.baseline_dtype,
                   help="float32, bfloat16 or float16 (cuda), or several comma-separated: "
                        "each runs in its own process, the first is the main comparison")
    p.add_argument("--compile", action="store_true", help="torch.compile the baseline UNet (untested)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--name", help="file stem (default: model-backend-size-steps-machine)")
    a = p.parse_args(argv)
    batches = tuple(int(x) for x in a.throughput_batches.split(",") if x.strip())
    a.baseline_dtypes = [x.strip() for x in a.baseline_dtype.split(",") if x.strip()]
    bad = [x for x in a.baseline_dtypes if x not in ("float32", "bfloat16", "float16")]
    if bad or not a.baseline_dtypes:
        p.error(f"--baseline-dtype: {', '.join(bad) or 'none'} is not float32, bfloat16 or float16")
    s = Settings(a.model, a.backend, a.prompt, a.negative_prompt, a.steps, a.scheduler,
                 a.guidance_scale, a.height, a.width, a.batch_size, a.seed, a.warmup, a.runs,
                 batches, a.throughput_warmup, a.throughput_runs, not a.no_safety,
                 not a.no_alloc_probe, not a.no_cuda_graph, a.precision, a.baseline_device,
                 a.baseline_dtypes[0], a.compile)
    if s.runs < 1 or s.warmup < 0 or s.warmup + s.runs < 1:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if "float16" in a.baseline_dtypes and s.baseline_device == "cpu":
        p.error("--baseline-dtype float16 needs --baseline-device cuda")
    return s, a


def spawn(which: str, s: Settings, work: Path, env: dict[str, str], tag: str = "") -> dict:
    """Run one worker process to completion; its figures (partial if it died)."""
    out = work / f"{which}{tag}.json"
    print(f"--- {which}: starting a fresh process", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "benchmarks.worker", which, s.to_json(), str(out), repr(time.time())]
    rc = subprocess.run(cmd, env=env).returncode
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["returncode"] = rc
    if rc:
        print(f"--- {which}: exited with {rc}; keeping what it reported", file=sys.stderr, flush=True)
    return result


def closeness(work: Path, result: dict, tag: str = "") -> dict | None:
    a, b = work / "ours.images.npy", work / f"diffusers{tag}.images.npy"
    if not (a.is_file() and b.is_file()):
        return None
    x, y = np.load(a).astype(np.int16), np.load(b).astype(np.int16)  # [B, H, W, 3]
    if x.shape != y.shape:
        return {"error": f"shapes differ: {x.shape} vs {y.shape}"}
    d = np.abs(x - y)
    return {"max_abs": int(d.max()), "mean_abs": float(d.mean()), "shape": list(x.shape),
            "nsfw_ours": result["ours"].get("nsfw"), "nsfw_diffusers": result["diffusers"].get("nsfw")}


def main(argv: list[str] | None = None) -> int:
    s, a = parse_args(argv)
    from runtime.bundle import read_manifest

    bundle = resolve(s.model)
    manifest = read_manifest(bundle)
    info = machine.info()
    baseline = f"torch {s.baseline_device} {s.baseline_dtype}" + (" compiled" if s.compile else " eager")
    result: dict = {
        "schema": 1, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": info, "settings": json.loads(s.to_json()), "baseline": baseline,
        "bundle": {"path": str(bundle), "source": manifest.source, "packages": manifest.packages},
        "untested": ["CUDA paths (--backend ort-cuda/tensorrt, --baseline-device cuda, --compile)"]
        if not info["gpus"] else [],
    }
    print(f"benchmark: {s.model} ({bundle}) on {info['name']}; ours {s.backend} vs diffusers "
          f"{baseline}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    work = Path(tempfile.mkdtemp(prefix="sdrt-bench-"))
    try:
        if not a.no_build:
            cache_dir = work / "engine-cache"  # empty: the build is timed from scratch
            env["SDRT_CACHE_DIR"] = str(cache_dir)
            result["build"] = spawn("build", s, work, env)
        result["ours"] = spawn("ours", s, work, env)
        if not a.no_baseline:
            result["diffusers"] = spawn("diffusers", s, work, env)
            result["closeness"] = closeness(work, result)
            result["more_baselines"] = {}  # the other --baseline-dtype values, same run
            for dtype in a.baseline_dtypes[1:]:
                other = spawn("diffusers", replace(s, baseline_dtype=dtype), work, env, f"-{dtype}")
                other["closeness"] = closeness(work, {"ours": result["ours"], "diffusers": other},
                                               f"-{dtype}")
                result["more_baselines"][dtype] = other
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = machine.load_average()
    stem = a.name or machine.slug(f"{report.model_label(result)}-{s.backend}-{s.width}x{s.height}-"
                                  f"{s.steps}steps-{info['name']}")
    paths = report.write(result, a.out, stem)
    print(report.markdown(result))
    for p in paths.values():
        print(f"wrote {p}", file=sys.stderr)
    failed = [k for k in ("build", "ours", "diffusers") if result.get(k, {}).get("returncode", 0)]
    failed += [f"diffusers {k}" for k, v in result.get("more_baselines", {}).items() if v.get("returncode")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

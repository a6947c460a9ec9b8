"""`python -m benchmarks.device`: the GPU benchmark as four back-to-back device calls.

The GPU machine is lent 15 minutes at a time, start-up included, and goes cold 30 s
after a call; onnxruntime-gpu reaches it in four parts (device_kit.py). So the run is
prepared here and rehearsed here, and on the machine it only runs:

    here, once:  python -m benchmarks.device pack          # .devicekit/: 4 parts + wheels
    call 1:  python3 -m benchmarks.device start      carry .devicekit/ort-part-00-of-04 .devicekit/wheels
    call 2:  python3 -m benchmarks.device part       carry .devicekit/ort-part-01-of-04
    call 3:  python3 -m benchmarks.device part --wait 400    carry .devicekit/ort-part-02-of-04
    call 4:  python3 -m benchmarks.device finish     carry .devicekit/ort-part-03-of-04   (timeout 600)
    here:        python -m benchmarks.device rehearse       # the same phases on this CPU

`start` launches `prepare` in its own session, so it runs on while the parts travel:
small wheels installed, `sd14-random` exported, the `ort-cuda` fp16 graphs built with
the machine's own onnxruntime. `finish` joins and installs onnxruntime-gpu, proves the
CUDA provider is really active (ONNX Runtime falls back to the CPU silently), waits for
`prepare`, then runs, most important first: ours (ort-cuda fp16, CUDA graph) vs
diffusers fp16 (SDPA) with PNDM, the gpu-marked tests, Euler, ours against diffusers
fp32, ours without the CUDA graph, and diffusers' own fp32-vs-fp16 spread
(benchmarks/spread.py); 512x512, 50 steps, CFG 7.5, batch 1 (and 4 for throughput).
Everything lands in $OUT (at most 8 files come back): summary.json, device.log,
prepare.log and each result's JSON (re-render the markdown and charts here with
`python -m benchmarks.report`); the last line printed is a one-line summary.

`rehearse` runs prepare and finish here: the demo model instead of sd14-random, a few
steps, ort-cpu standing in for ort-cuda and diffusers fp32 on the CPU for its fp16 on
the GPU, the parts joined and checked when .devicekit/ has them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import device_kit as kit

REPO = Path(__file__).resolve().parent.parent
STATE = Path("/tmp/sdrt-device")  # on the GPU machine; lives while it stays warm


@dataclass(frozen=True)
class Plan:
    """What a run measures: the real one on the GPU, or its rehearsal on this CPU."""

    rehearse: bool
    model: str  # exported into STATE/bundle
    backend: str
    provider: str  # the ONNX Runtime provider that must be active
    baseline: tuple[str, str]  # diffusers' device, dtype
    steps: int
    warmup: int
    runs: int
    batches: str  # throughput batch sizes
    export_timeout: float
    build_timeout: float
    bench_timeout: float
    deadline: float  # seconds `finish` may take in all (the device call's limit is 600)


GPU = Plan(False, "sd14-random", "ort-cuda", "CUDAExecutionProvider", ("cuda", "float16"),
           steps=50, warmup=1, runs=3, batches="1,4", export_timeout=480, build_timeout=480,
           bench_timeout=240, deadline=540)
CPU = Plan(True, "demo", "ort-cpu", "CPUExecutionProvider", ("cpu", "float32"),
           steps=3, warmup=1, runs=1, batches="", export_timeout=300, build_timeout=300,
           bench_timeout=300, deadline=1800)

# (result name, scheduler, extra benchmarks.run flags), most important first
# fp32ref: our fp16 picture against diffusers' fp32 one (on sd14-random diffusers' own
# fp16 picture differs from its fp32 one by a mean of 45/255: results/*spread*)
BENCHES = (("pndm", "pndm", ()), ("euler", "euler", ()),
           ("pndm-fp32ref", "pndm", ("--baseline-dtype", "float32", "--runs", "1",
                                     "--throughput-batches", "1")),
           ("pndm-nograph", "pndm", ("--no-cuda-graph", "--no-baseline")))

# Proves the provider is active on a real graph: a session asked for CUDA that ORT
# quietly put on the CPU is the failure this catches.
CHECK = """
import sys, numpy as np, onnxruntime as ort
provider, graph = sys.argv[1], sys.argv[2]
print("onnxruntime", ort.__version__, "from", ort.__file__, "providers", ort.get_available_providers())
s = ort.InferenceSession(graph, providers=[provider])
assert s.get_providers()[0] == provider, f"{provider} not active: {s.get_providers()}"
out = s.run(None, {"input_ids": np.zeros((2, 77), np.int32)})[0]
assert np.isfinite(out).all()
print(provider, "active; ran", graph, "->", out.shape)
"""


class Run:
    """The folders and environment of one run (STATE on the device, a temp dir here)."""

    def __init__(self, plan: Plan, state: Path, repo: Path):
        self.plan, self.state, self.repo = plan, state, repo
        self.parts, self.site, self.ort_site = state / "parts", state / "site", state / "ort-site"
        self.bundle, self.cache, self.results = state / "bundle", state / "cache", state / "results"

    def env(self, with_ort_gpu: bool) -> dict[str, str]:
        paths = ([str(self.ort_site)] if with_ort_gpu else []) + [str(self.site), str(self.repo)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "SDRT_CACHE_DIR": str(self.cache),
               "PYTHONUNBUFFERED": "1"}
        if with_ort_gpu:
            env["LD_LIBRARY_PATH"] = kit.cuda_library_path()
        return env

    def take_parts(self, carried: Path) -> list[str]:
        """Copy the parts this call carried into STATE/parts; the names copied."""
        self.parts.mkdir(parents=True, exist_ok=True)
        got = []
        for p in sorted(carried.glob("ort-part-*-of-*")):
            shutil.copyfile(p, self.parts / p.name)
            got.append(p.name)
        return got

    def prepare_status(self) -> dict | None:
        try:
            return json.loads((self.state / "prepare.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None


def prepare(run: Run) -> int:
    """Wheels, export, ort-cuda build; STATE/prepare.json says how each went."""
    p, py = run.plan, sys.executable
    steps = kit.Steps(run.state / "prepare.log")
    wheels = sorted((run.repo / kit.KIT / "wheels").glob("*.whl"))
    if wheels:
        steps.run("wheels", kit.pip_install(wheels, run.site), 180)
    else:
        steps.note("wheels", None if p.rehearse else False, f"none in {kit.KIT / 'wheels'}")
    env = run.env(with_ort_gpu=False)
    steps.run("export", [py, "-m", "export", "--model", p.model, "--out", str(run.bundle), "--force",
                         "--no-safety-checker"], p.export_timeout, env, run.repo)
    # the machine's own onnxruntime (CPU) runs the optimizer; same major.minor as the
    # onnxruntime-gpu that runs the result, so the cache key matches (ORT_GPU_VERSION)
    steps.run("build", [py, "-m", "engines.build", str(run.bundle), "--backend", "ort-cuda",
                        "--cache-dir", str(run.cache)], p.build_timeout, env, run.repo)
    steps.write(run.state / "prepare.json", done=True)
    return 0 if all(r["ok"] is not False for r in steps.records) else 1


def start(run: Run, carried: Path) -> int:
    """Call 1: keep the part, copy the repo out of the synced tree, launch prepare."""
    run.state.mkdir(parents=True, exist_ok=True)
    print("parts here:", run.take_parts(carried))
    copy = run.state / "repo"
    shutil.rmtree(copy, ignore_errors=True)
    skip = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "ort-part-*")
    shutil.copytree(run.repo, copy, ignore=skip)
    log = open(run.state / "prepare.out", "w")  # noqa: SIM115 (the child owns it)
    cmd = [sys.executable, "-m", "benchmarks.device", "prepare", "--state", str(run.state)]
    child = subprocess.Popen(cmd + (["--rehearse"] if run.plan.rehearse else []), cwd=copy,
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    print(f"prepare started (pid {child.pid}) in {copy}; log {run.state / 'prepare.log'}")
    time.sleep(3)
    return 0 if child.poll() in (None, 0) else 1


def wait_prepare(run: Run, seconds: float) -> dict | None:
    end = time.monotonic() + seconds
    while True:
        status = run.prepare_status()
        if status is not None or time.monotonic() >= end:
            return status
        time.sleep(2)


def part(run: Run, carried: Path, wait: float) -> int:
    """Calls 2 and 3: keep the part; optionally wait for prepare (time the machine is
    held anyway, spent here instead of in the last call's 10 minutes)."""
    print("parts here:", sorted(p.name for p in run.parts.glob("*")), "+", run.take_parts(carried))
    status = wait_prepare(run, wait)
    log = run.state / "prepare.log"
    print(log.read_text()[-3000:] if log.is_file() else "no prepare log yet")
    print("prepare:", "done" if status else "still running")
    return 0


def bench_cmd(run: Run, name: str, scheduler: str, extra: tuple[str, ...]) -> list[str]:
    p = run.plan
    return [sys.executable, "-m", "benchmarks.run", "--model", str(run.bundle), "--backend", p.backend,
            "--scheduler", scheduler, "--steps", str(p.steps), "--warmup", str(p.warmup),
            "--runs", str(p.runs), "--throughput-batches", p.batches, "--no-safety", "--no-build",
            "--baseline-device", p.baseline[0], "--baseline-dtype", p.baseline[1],
            "--out", str(run.results), "--name", name, *extra]


def headline(results: Path, name: str) -> str | None:
    try:
        r = json.loads((results / f"{name}.json").read_text())
        ours = r["ours"]["stages"]["total"]["p50"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    base = (r.get("diffusers") or {}).get("stages", {}).get("total", {}).get("p50")
    vs = f" vs diffusers {base:.3f} s ({base / ours:.2f}x)" if base else ""
    return f"{name}: ours {ours:.3f} s{vs}"


def finish(run: Run, carried: Path, out: Path, deadline: float | None = None,
           tests_only: bool = False) -> int:
    """Call 4 (or the rehearsal's second half): everything that needs onnxruntime-gpu.
    `deadline`: seconds it may take (default the plan's); give what the lease has left.
    `tests_only`: the gpu-marked tests and nothing else (no prepare needed)."""
    p, py = run.plan, sys.executable
    out.mkdir(parents=True, exist_ok=True)
    steps = kit.Steps(out / "device.log", deadline=time.monotonic() + (deadline or p.deadline))
    run.take_parts(carried)
    gpu_env = run.env(with_ort_gpu=not p.rehearse)
    try:
        wheel = kit.assemble(run.parts, run.state / "ort")
        steps.note("parts", True, wheel.name)
        if not p.rehearse:
            steps.run("install", kit.pip_install([wheel], run.ort_site), 180)
    except RuntimeError as e:
        steps.note("parts", None if p.rehearse else False, str(e))
    demo_te = run.repo / "runtime" / "demo_bundle" / "text_encoder.onnx"
    check = steps.run("provider", [py, "-c", CHECK, p.provider, str(demo_te)], 120, gpu_env)
    if not check["ok"]:
        if not p.rehearse:  # which CUDA library the provider could not find, for next time
            lib = run.ort_site / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
            steps.run("diagnose", ["ldd", str(lib)], 30, gpu_env)
        return summarize(run, steps, out, "the ONNX Runtime provider check failed")
    gpu_tests = ("gpu-tests", [py, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider",
                               "tests/test_engines_ort_cuda.py", "tests/test_tensorrt_gpu.py"])
    if tests_only:
        steps.run(gpu_tests[0], gpu_tests[1], 180, gpu_env, run.repo)
        return summarize(run, steps, out, None)
    status = wait_prepare(run, max(0.0, steps.left() - 240))
    if (run.state / "prepare.log").is_file():
        shutil.copyfile(run.state / "prepare.log", out / "prepare.log")
    if status is None:
        return summarize(run, steps, out, "prepare did not finish in time")
    steps.records += [{**r, "phase": f"prepare/{r['phase']}"} for r in status["phases"]]
    engines = [py, "-m", "engines.build", str(run.bundle), "--backend", "ort-cuda", "--cache-dir",
               str(run.cache)]
    if not steps.run("engines-check", [*engines, "--no-build"], 120, gpu_env)["ok"]:
        steps.run("engines-rebuild", engines, p.build_timeout, gpu_env)  # another ORT version
    for i, (name, scheduler, extra) in enumerate(BENCHES):
        if p.backend == "ort-cpu" and name != "pndm" and name != "euler":
            continue  # nothing to compare without a GPU
        steps.run(f"bench-{name}", bench_cmd(run, name, scheduler, extra), p.bench_timeout,
                  gpu_env, run.repo)
        keep(run.results / f"{name}.json", out)
        if i == 0:  # the tests right after the headline: they prove the path is right
            steps.run(gpu_tests[0], gpu_tests[1], 180, gpu_env, run.repo)
    spread = run.results / "spread.json"  # diffusers' own fp32 -> fp16 difference
    steps.run("spread", [py, "-m", "benchmarks.spread", str(run.bundle), "--steps",
                         *map(str, sorted({3, p.steps})), "--device", p.baseline[0],
                         "--out", str(spread)], p.bench_timeout, gpu_env, run.repo)
    keep(spread, out)
    return summarize(run, steps, out, None)


def keep(path: Path, out: Path) -> None:
    """Into $OUT (8 files come back: the .md and .png are re-rendered from the JSON here)."""
    if path.is_file():
        shutil.copyfile(path, out / path.name)


def summarize(run: Run, steps: kit.Steps, out: Path, stopped: str | None) -> int:
    lines = [h for n, _, _ in BENCHES if (h := headline(run.results, n))]
    failed = [r["phase"] for r in steps.records if r["ok"] is False]
    steps.write(out / "summary.json", plan=run.plan.__dict__, stopped=stopped, headlines=lines)
    verdict = f"stopped: {stopped}" if stopped else (f"failed: {', '.join(failed)}" if failed else "all ok")
    print(f"device run ({'rehearsal' if run.plan.rehearse else 'GPU'}): {verdict}; "
          + ("; ".join(lines) or "no benchmark finished"), flush=True)
    return 1 if stopped or failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("pack", "start", "part", "finish", "prepare", "rehearse"))
    ap.add_argument("--state", type=Path, default=None, help=f"work folder (default {STATE}; "
                    "rehearse: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default $OUT)")
    ap.add_argument("--wait", type=float, default=0, help="part: seconds to wait for prepare")
    ap.add_argument("--parts", type=int, default=4, help="pack: how many parts")
    ap.add_argument("--deadline", type=float, default=None,
                    help=f"finish: seconds it may take in all (default {GPU.deadline:g}); set it "
                    "to the lease's budget_left_s minus a minute so results come back")
    ap.add_argument("--rehearse", action="store_true", help="prepare/finish: the CPU stand-ins")
    ap.add_argument("--tests-only", action="store_true",
                    help="finish: only the gpu-marked tests (parts still needed, no start)")
    a = ap.parse_args(argv)
    carried = REPO / kit.KIT
    if a.command == "pack":
        for path in kit.pack(REPO, count=a.parts):
            print(f"{path} {path.stat().st_size / 2**20:.1f} MiB")
        return 0
    if a.command == "rehearse":
        import tempfile

        state = a.state or Path(tempfile.mkdtemp(prefix="sdrt-rehearse-"))
        run = Run(CPU, state, REPO)
        run.state.mkdir(parents=True, exist_ok=True)
        prepare(run)
        return finish(run, carried, a.out or state / "out")
    run = Run(CPU if a.rehearse else GPU, a.state or STATE, REPO)
    if a.command == "prepare":
        return prepare(run)
    if a.command == "start":
        return start(run, carried)
    if a.command == "part":
        return part(run, carried, a.wait)
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        ap.error("finish needs --out or $OUT")
    return finish(run, carried, out, a.deadline, a.tests_only)


if __name__ == "__main__":
    sys.exit(main())

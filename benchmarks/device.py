"""`python -m benchmarks.device`: the GPU benchmark as five back-to-back device calls.

The GPU machine is lent 15 minutes at a time, start-up included, and goes cold 30 s
after a call; onnxruntime-gpu reaches it in five parts (device_kit.py). So the run is
prepared here and rehearsed here, and on the machine it only runs. The exact calls, what
each carries and its time limit are in README.md ("Running the GPU benchmark"):

    here, once:  python -m benchmarks.device pack        # .devicekit/: 5 parts + wheels
    here:        python -m benchmarks.device rehearse    # the same phases on this CPU
    call 1:      python3 -m benchmarks.device start      # + launches prepare
    calls 2-4:   python3 -m benchmarks.device part [--wait S]
    call 5:      python3 -m benchmarks.device finish --deadline D

`start` launches `prepare` in its own session, so it runs on while the parts travel:
small wheels installed, `sd14-random` exported, the `ort-cuda` fp16 graphs built with
the machine's own onnxruntime. `finish` joins and installs onnxruntime-gpu, proves the
CUDA provider is really active (ONNX Runtime falls back to the CPU silently), waits for
`prepare`, then runs the benchmarks of device_plan.BENCHES, most important first, the
gpu-marked tests after the first, and diffusers' own fp32-vs-fp16 spread last
(benchmarks/spread.py); 512x512, 50 steps, CFG 7.5, batch 1 (and 4 for throughput).
Everything lands in $OUT (at most 8 files come back): summary.json, device.log,
prepare.log and each result's JSON (re-render the markdown and charts here with
`python -m benchmarks.report`); the last line printed is a one-line summary.

A call that finds the machine cold (a part missing, no prepare running) says so and
exits 1 at once instead of waiting: start over from call 1.

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
from pathlib import Path

from benchmarks import device_kit as kit
from benchmarks.device_plan import BENCHES, CHECK, CPU, GPU, STATE, Run, bench_cmd

REPO = Path(__file__).resolve().parent.parent


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
    """Call 1: keep the part, copy the repo out of the synced tree, launch prepare.
    A warm machine from an earlier try keeps its parts; its results and prepare status
    are cleared so nothing stale is reported as new."""
    pid = run.prepare_pid()
    if pid is not None:
        print(f"prepare from an earlier start is still running (pid {pid}): let it finish "
              f"(part --wait) or give the machine back", file=sys.stderr)
        return 1
    run.state.mkdir(parents=True, exist_ok=True)
    for stale in ("prepare.json", "prepare.log", "prepare.pid"):
        (run.state / stale).unlink(missing_ok=True)
    shutil.rmtree(run.results, ignore_errors=True)
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
    (run.state / "prepare.pid").write_text(str(child.pid))
    print(f"prepare started (pid {child.pid}) in {copy}; log {run.state / 'prepare.log'}")
    time.sleep(3)
    return 0 if child.poll() in (None, 0) else 1


def wait_prepare(run: Run, seconds: float) -> dict | None:
    """prepare.json once prepare is done; None at once if no prepare runs (it died, or
    this is a fresh machine), else None after `seconds`."""
    end = time.monotonic() + seconds
    while True:
        status = run.prepare_status()
        if status is not None or time.monotonic() >= end or run.prepare_pid() is None:
            return status or run.prepare_status()
        time.sleep(2)


def missing_earlier_parts(run: Run, carried: Path) -> list[str]:
    """Parts the calls before this one brought that are not here: the machine went cold."""
    have = {p.name for p in (*run.parts.glob("ort-part-*"), *carried.glob("ort-part-*"))}
    missing = []
    for p in carried.glob("ort-part-*-of-*"):
        names = kit.part_names(int(p.name.rsplit("-", 1)[1]))
        missing += [n for n in names[:names.index(p.name)] if n not in have]
    return sorted(set(missing))


def part(run: Run, carried: Path, wait: float, tests_only: bool = False) -> int:
    """Calls 2 to 4: keep the part; optionally wait for prepare (time the machine is
    held anyway, spent here instead of in the last call's 10 minutes)."""
    cold = missing_earlier_parts(run, carried)
    if not tests_only and not (run.state / "repo").is_dir():
        cold.append("the repo copy `start` makes")
    if cold:
        print(f"machine went cold (missing: {', '.join(cold)}): start over from call 1",
              file=sys.stderr)
        return 1
    print("parts here:", sorted(p.name for p in run.parts.glob("*")), "+", run.take_parts(carried))
    if tests_only:
        return 0
    status = wait_prepare(run, wait)
    log = run.state / "prepare.log"
    print(log.read_text()[-3000:] if log.is_file() else "no prepare log yet")
    running = run.prepare_pid() is not None
    print("prepare:", "done" if status else "still running" if running else "NOT RUNNING")
    return 0 if status or running else 1


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
    """Call 5 (or the rehearsal's second half): everything that needs onnxruntime-gpu.
    `deadline`: seconds it may take (default the plan's); give what the lease has left.
    `tests_only`: the gpu-marked tests and nothing else (no prepare needed)."""
    p, py = run.plan, sys.executable
    out.mkdir(parents=True, exist_ok=True)
    steps = kit.Steps(out / "device.log", deadline=time.monotonic() + (deadline or p.deadline))
    shutil.rmtree(run.results, ignore_errors=True)  # only this call's results go back
    cold = missing_earlier_parts(run, carried)
    if cold:
        steps.note("parts", False, f"missing {', '.join(cold)}")
        return summarize(run, steps, out, "the machine went cold between calls: start over")
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
    ap.add_argument("--parts", type=int, default=5, help="pack: how many parts")
    ap.add_argument("--deadline", type=float, default=None,
                    help=f"finish: seconds it may take in all (default {GPU.deadline:g}); set it "
                    "to the lease's budget_left_s minus a minute so results come back")
    ap.add_argument("--rehearse", action="store_true", help="prepare/finish: the CPU stand-ins")
    ap.add_argument("--tests-only", action="store_true",
                    help="part/finish: only the gpu-marked tests (the parts, but no start)")
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
        rc = finish(run, carried, a.out or state / "out")
        shutil.rmtree(state / "ort", ignore_errors=True)  # the unpacked wheel: 340 MB
        return rc
    run = Run(CPU if a.rehearse else GPU, a.state or STATE, REPO)
    if a.command == "prepare":
        return prepare(run)
    if a.command == "start":
        return start(run, carried)
    if a.command == "part":
        return part(run, carried, a.wait, a.tests_only)
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        ap.error("finish needs --out or $OUT")
    return finish(run, carried, out, a.deadline, a.tests_only)


if __name__ == "__main__":
    sys.exit(main())

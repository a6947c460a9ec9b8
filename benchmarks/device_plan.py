"""What the GPU benchmark run measures (`Plan`: the real run, or its CPU rehearsal), the
benchmarks it runs, and the folders it works in (`Run`). benchmarks/device.py runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import device_kit as kit

STATE = Path("/tmp/sdrt-device")  # on the GPU machine; lives while it stays warm
MAX_FILES_BACK = 8  # the device returns at most this many files from $OUT
OTHER_FILES_BACK = ("summary.json", "device.log", "prepare.log", "spread.json")


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

    def prepare_pid(self) -> int | None:
        """The background prepare's pid while it runs, else None."""
        try:
            pid = int((self.state / "prepare.pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid



def bench_cmd(run: Run, name: str, scheduler: str, extra: tuple[str, ...]) -> list[str]:
    p = run.plan
    return [sys.executable, "-m", "benchmarks.run", "--model", str(run.bundle), "--backend", p.backend,
            "--scheduler", scheduler, "--steps", str(p.steps), "--warmup", str(p.warmup),
            "--runs", str(p.runs), "--throughput-batches", p.batches, "--no-safety", "--no-build",
            "--baseline-device", p.baseline[0], "--baseline-dtype", p.baseline[1],
            "--out", str(run.results), "--name", name, *extra]

"""Engine build time: our side's first load into an empty engine cache.

tensorrt, ort-cuda and ort-cpu build with `python -m engines.build` first (ort-cpu: the
graphs with onnxruntime's CPU fusions; tensorrt and ort-cuda UNTESTED here), then the
first load (ort-cpu: ORT's session optimizer, saved; openvino: the fp16-weight IRs).
The worker that runs next reuses the same cache folder, so its cold start is the
warm-cache restart a deployment sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.settings import Settings
from benchmarks.timing import peak_rss_bytes


def build(s: Settings, bundle: Path, log: Callable[[str], None]) -> dict:
    from runtime.pipeline import Pipeline

    out: dict = {"cache_dir": os.environ.get("SDRT_CACHE_DIR")}
    if s.backend in ("tensorrt", "ort-cuda", "ort-cpu"):  # ort-cpu: its CPU-fused graphs
        cmd = [sys.executable, "-m", "engines.build", str(bundle), "--backend", s.backend]
        if out["cache_dir"]:
            cmd += ["--cache-dir", out["cache_dir"]]
        log(" ".join(cmd))
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        out["engines_build_seconds"] = time.perf_counter() - t
    lines: list[str] = []

    def keep(msg: str) -> None:
        lines.append(msg)
        log(msg)

    pipe = Pipeline(bundle, s.backend, safety=s.safety, cuda_graph=s.cuda_graph,
                    precision=s.precision, log=keep)
    report = pipe.load_report
    pipe.close()
    out.update(load_seconds=report.seconds, log=lines, peak_rss=peak_rss_bytes(),
               graphs={name: {"seconds": g.seconds, "cache": g.cache}
                       for name, g in report.graphs.items()})
    return out

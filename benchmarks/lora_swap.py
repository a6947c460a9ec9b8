"""`python -m benchmarks.lora_swap`: what a run-time LoRA swap costs (issue 14).

Makes random PEFT-layout LoRA files for the bundle's UNet from its own weight name map
(attention, feed-forward and proj_in/out weights, rank --rank; numpy, no torch), then,
in this process: loads the bundle on --backend with a warm engine cache (the cold-load
figure), runs one generation, swaps A, B, A again and none, each followed by a
generation, and reads the swap times and the resident set size (VmRSS) after each.
ort-cpu: the first ever swap builds the LoRA-ready graph in the engine cache (run twice
and read the second); a swap between LoRAs writes the LoRA-ready engine's weight inputs
in place; the first swap loads that engine (every mapped weight). openvino: every swap
reads the UNet again and compiles it with the new weights. It also times UNet calls at
--step-size with LoRA A and with none (ort-cpu: the LoRA-ready engine against the
bundle's), and records the peak RSS (VmHWM) after each phase. Prints a JSON line; --json
writes it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import machine
from benchmarks.settings import resolve
from benchmarks.timing import peak_rss_bytes, rss_bytes
from runtime.bundle import read_manifest
from runtime.pipeline import Pipeline

TARGETS = re.compile(r"\.(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out"
                     r"|q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.weight$")  # UNet; text encoder


def random_lora(bundle: Path, path: Path, rank: int, seed: int,
                graphs: tuple[str, ...] = ("unet",)) -> int:
    """A diffusers/PEFT LoRA file for every target weight of these graphs (the UNet, the
    text encoder); returns its layers."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for graph in graphs:
        for name, w in (read_manifest(bundle).graphs[graph].weights or {}).items():
            if not TARGETS.search(name):
                continue
            shape = w.shape[::-1] if w.transposed else w.shape  # the parameter's: [out, in, ...]
            module = f"{graph}.{name.removesuffix('.weight')}"
            tensors[f"{module}.lora_A.weight"] = (0.02 * rng.standard_normal(
                (rank, *shape[1:]))).astype(np.float32)
            tensors[f"{module}.lora_B.weight"] = (0.02 * rng.standard_normal(
                (shape[0], rank, *([1] * (len(shape) - 2))))).astype(np.float32)
    save_file(tensors, str(path))
    return len(tensors) // 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_swap", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd14-random", help="demo | sd14-random | bundle folder")
    p.add_argument("--backend", default="ort-cpu",
                   choices=("ort-cpu", "ort-cuda", "openvino", "tensorrt"),
                   help="ort-cpu, ort-cuda: a LoRA-ready graph; openvino: recompiles; "
                        "tensorrt: refits")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="image side of the generations (px)")
    p.add_argument("--step-size", type=int, default=512,
                   help="image side of the UNet-call timing, bundle's engine vs LoRA-ready (px)")
    p.add_argument("--step-calls", type=int, default=4, help="UNet calls per timing (the first is left out)")
    p.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    bundle = resolve(a.model)
    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: Path(tmp) / f"lora_{k}.safetensors" for k in "AB"}
        layers = [random_lora(bundle, f, a.rank, seed) for seed, f in enumerate(files.values())][0]
        t = time.perf_counter()
        pipe = Pipeline(bundle, a.backend, safety=False)
        out: dict = {"cold_load_s": time.perf_counter() - t, "layers": layers, "rank": a.rank,
                     "backend": pipe.backend, "precision": pipe.precision}

        def generate(label: str) -> None:
            pipe("a lighthouse", steps=1, height=a.size, width=a.size, seed=1)
            out[f"rss_{label}_gib"] = (rss_bytes() or 0) / gib
            out[f"peak_rss_after_{label}_gib"] = peak_rss_bytes() / gib  # VmHWM so far

        def unet_call_s(label: str) -> None:  # euler: one UNet call per step
            r = pipe("a lighthouse", steps=a.step_calls, scheduler="euler", height=a.step_size,
                     width=a.step_size, seed=1)
            out[f"unet_call_{label}_s"] = float(np.median(r.unet_calls[1:]))

        generate("no_lora")
        for label, loras in (("A", [(files["A"], 1.0)]), ("B", [(files["B"], 0.8)]),
                             ("A_again", [(files["A"], 1.0)]), ("none", [])):
            t = time.perf_counter()
            pipe.set_loras(loras)
            out[f"swap_{label}_s"] = time.perf_counter() - t
            generate(label)
            # last, so that the bigger activations' memory stays out of the RSS figures
            if label in ("A_again", "none") and a.step_calls > 1:
                unet_call_s("lora_ready" if label == "A_again" else "bundle")
        pipe.close()
    out["peak_rss_gib"] = peak_rss_bytes() / gib
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    out["swap_vs_cold_load"] = round(out["swap_B_s"] / out["cold_load_s"], 2)
    if "unet_call_bundle_s" in out:
        out["unet_call_lora_ready_vs_bundle"] = round(out["unet_call_lora_ready_s"]
                                                      / out["unet_call_bundle_s"], 3)
    out["machine"] = machine.name(machine.info())
    out["cpu"] = machine.info()["cpu"]
    out["command"] = "python -m benchmarks.lora_swap " + " ".join(sys.argv[1:] if argv is None else argv)
    line = json.dumps(out)
    print(line)
    if a.json:
        a.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

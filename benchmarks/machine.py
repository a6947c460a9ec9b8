"""What machine and which library versions a benchmark ran on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess

PACKAGES = ("numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tokenizers", "onnx", "torch",
            "diffusers", "transformers", "tensorrt", "cuda-python", "pillow")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^(model name|Model|Hardware)\s*:\s*(.+)$", text, re.M)
    fam = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M)
    model = re.search(r"^model\s*:\s*(\d+)$", text, re.M)
    out = name.group(2).strip() if name else platform.machine()
    if fam and model:
        out += f" (family {fam.group(1)} model {model.group(1)})"
    if re.search(r"^flags\s*:.*\bhypervisor\b", text, re.M):
        out += ", virtual machine"
    return out


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None


def _gpus() -> list[dict[str, str]]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(("name", "memory", "driver"), (s.strip() for s in line.split(",")), strict=False))
            for line in out.splitlines() if line.strip()]


def gpu_memory_used_by(pid: int) -> int | None:
    """Device memory (bytes) nvidia-smi attributes to process `pid`, or None. UNTESTED here."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [s.strip() for s in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1]) * 2**20
    return None


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def info() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = _gpus()
    mem = _memory_bytes()
    d = {
        "cpu": _cpu_model(), "cpu_cores": cores, "memory_bytes": mem,
        "gpus": gpus, "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "hostname": platform.node(),
        "packages": versions(),
    }
    try:
        import onnxruntime as ort

        d["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    d["name"] = name(d)
    d["load_average_at_start"] = load_average()
    return d


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on a shared machine skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def name(d: dict) -> str:
    """A short machine label for file names and tables: GPU if any, else CPU and cores."""
    if d["gpus"]:
        return d["gpus"][0]["name"]
    cpu = re.sub(r"\s*\(.*", "", d["cpu"]).replace("(R)", "").replace("(TM)", "")
    mem = f", {d['memory_bytes'] / 2**30:.0f} GiB" if d.get("memory_bytes") else ""
    return f"{cpu}, {d['cpu_cores']} cores{mem}"


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")

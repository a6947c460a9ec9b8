"""What travels to the GPU machine, and the steps that run there, as plain functions.

The GPU machine (DEVELOPERS.md, ../shared/device/README.md) has torch but neither
onnxruntime-gpu nor diffusers, and no network; one call carries at most 64 MiB with
the working tree. So `pack` (here) downloads onnxruntime-gpu, re-packs it as one xz
stream and splits that into equal parts, each small enough to travel with the tree
in its own call; the small pure-Python wheels (diffusers) travel with the first part.
On the device `assemble` joins the parts back (xz's CRC catches a damaged or missing
one) and `pip_install` puts everything under a folder on PYTHONPATH.

`Steps` runs one command per phase with its own deadline, echoes its output with a
phase tag, and records rc / seconds / ok for the summary, so a phase that fails or
hangs costs only its own time and the phases after it still run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from runtime.files import write_atomic  # stdlib only: safe before anything is installed

KIT = Path(".devicekit")  # git-ignored: the parts and wheels `carry` names
ORT_GPU_VERSION = "1.30.0"  # = the GPU machine's own onnxruntime (CPU): the engines it
# builds there and the onnxruntime-gpu that runs them share one cache key (major.minor)
SMALL_WHEELS = ("diffusers==0.42.1", "importlib_metadata==8.7.0")  # the rest is there
PART_LIMIT = 64 * 2**20  # one call's carry, the working tree included
PY = ("--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
      "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
      "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64")


def part_names(count: int) -> list[str]:
    return [f"ort-part-{i:02d}-of-{count:02d}" for i in range(count)]


def split_stream(src: Path, out_dir: Path, count: int) -> list[Path]:
    """Cut `src` into `count` parts of (nearly) equal size, named by `part_names`."""
    size = src.stat().st_size
    each = -(-size // count)
    paths = []
    with open(src, "rb") as f:
        for name in part_names(count):
            p = out_dir / name
            p.write_bytes(f.read(each))
            paths.append(p)
    return paths


def tree_bytes(repo: Path) -> int:
    """Bytes of what travels besides `carry`: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, capture_output=True, check=True).stdout
    return sum((repo / n).stat().st_size for n in out.decode().split("\0")
               if n and (repo / n).is_file())


def pack(repo: Path, version: str = ORT_GPU_VERSION, count: int = 5) -> list[Path]:
    """Download onnxruntime-gpu (CUDA 13, cp312) and SMALL_WHEELS into KIT, the former
    as `count` xz parts. Checks that each call's carry fits with the tree."""
    kit = repo / KIT
    shutil.rmtree(kit, ignore_errors=True)
    (kit / "wheels").mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PY]
    subprocess.run([*pip, "-d", str(kit / "wheels"), *SMALL_WHEELS], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        subprocess.run([*pip, "-d", str(t / "dl"), f"onnxruntime-gpu=={version}"], check=True)
        wheel = next((t / "dl").glob("*.whl"))
        # re-zipped uncompressed, so xz -9 sees the raw CUDA kernels (185 MB instead of 230)
        stored = t / "ortgpu" / wheel.name
        stored.parent.mkdir()
        with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zout:
            for item in zin.infolist():
                zout.writestr(item, zin.read(item.filename), zipfile.ZIP_STORED)
        wheel.unlink()
        stream = t / "ortgpu.tar.xz"
        subprocess.run(f"tar -C {t} -cf - ortgpu | xz -T0 -9 > {stream}", shell=True, check=True)
        parts = split_stream(stream, kit, count)
    tree = tree_bytes(repo)
    wheels = sum(p.stat().st_size for p in (kit / "wheels").iterdir())
    biggest = max(p.stat().st_size for p in parts)
    if tree + wheels + biggest > PART_LIMIT:
        raise SystemExit(f"pack: the first call would carry {(tree + wheels + biggest) / 2**20:.1f} "
                         f"MiB (limit {PART_LIMIT / 2**20:.0f}); use more parts (--parts)")
    return parts


def assemble(parts_dir: Path, dest: Path) -> Path:
    """Join every `ort-part-*-of-NN` in `parts_dir` into `dest`; return the wheel.
    Raises RuntimeError naming what is missing (the machine went cold between calls)."""
    found = sorted(parts_dir.glob("ort-part-*-of-*"))
    if not found:
        raise RuntimeError(f"no onnxruntime-gpu parts in {parts_dir}")
    count = int(found[0].name.rsplit("-", 1)[1])
    missing = sorted(set(part_names(count)) - {p.name for p in found})
    if missing:
        raise RuntimeError(f"parts missing: {', '.join(missing)} (the machine went cold "
                           f"between calls: start over from the first call)")
    dest.mkdir(parents=True, exist_ok=True)
    cat = subprocess.Popen(["cat", *map(str, found)], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-xJ", "-C", str(dest)], stdin=cat.stdout, capture_output=True)
    cat.wait()
    if untar.returncode:
        raise RuntimeError(f"parts do not unpack: {untar.stderr.decode().strip()[:200]}")
    wheels = sorted(dest.glob("ortgpu/onnxruntime_gpu-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one onnxruntime_gpu wheel in the parts, found {len(wheels)}")
    with zipfile.ZipFile(wheels[0]) as z:
        if "onnxruntime/capi/libonnxruntime_providers_cuda.so" not in z.namelist():
            raise RuntimeError(f"{wheels[0].name} has no CUDA provider library")
    return wheels[0]


def pip_install(wheels: Sequence[Path], target: Path) -> list[str]:
    """`pip install --no-deps --no-index --target` (nothing is fetched). The command."""
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
            *map(str, wheels)]


def cuda_library_path() -> str:
    """The lib folders of the nvidia-* pip packages (cuBLAS, cuDNN, cudart, ...) beside
    this Python, for onnxruntime-gpu's CUDA provider, before any LD_LIBRARY_PATH."""
    import site

    roots = [*site.getsitepackages(), site.getusersitepackages()]
    dirs = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})
    old = os.environ.get("LD_LIBRARY_PATH")
    return os.pathsep.join(dirs + ([old] if old else []))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the phase and everything it started
    except ProcessLookupError:
        pass


class Steps:
    """Run phases one after another, each with a deadline; keep every phase's record."""

    def __init__(self, log_path: Path, deadline: float | None = None):
        self.log_path = log_path
        self.deadline = deadline  # time.monotonic() after which no phase starts or runs on
        self.records: list[dict] = []

    def say(self, msg: str) -> None:
        line = f"[device {time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def note(self, name: str, ok: bool | None, detail: str = "", **extra: object) -> dict:
        rec = {"phase": name, "ok": ok, "detail": detail, **extra}
        self.records.append(rec)
        self.say(f"{name}: {'ok' if ok else 'skipped' if ok is None else 'FAILED'}"
                 + (f" ({detail})" if detail else ""))
        return rec

    def run(self, name: str, cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> dict:
        """Run `cmd`, its output tagged into the log; killed (whole process group) at
        min(timeout, what the deadline leaves)."""
        limit = min(timeout, self.left() - 5)
        if limit < 10:
            return self.note(name, False, "no time left", rc=None, seconds=0.0)
        shown = " ".join(c if len(c) < 120 else c[:40].replace("\n", " ") + "..." for c in cmd)
        self.say(f"{name}: {shown} (limit {limit:.0f} s)")
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=dict(env) if env else None,
                                    cwd=cwd, start_new_session=True, text=True, errors="replace")
        except OSError as e:  # no such program: this phase failed, the next ones still run
            return self.note(name, False, f"cannot start: {e}", rc=None, seconds=0.0)
        timer = threading.Timer(limit, _kill_group, (proc.pid,))
        timer.start()
        try:
            with open(self.log_path, "a") as log:
                for line in proc.stdout:  # type: ignore[union-attr]
                    if "it/s]" in line:  # progress bars: noise in a log
                        continue
                    log.write(f"  {name}| {line}")
                    log.flush()
                    print(f"  {name}| {line}", end="", file=sys.stderr, flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
        seconds = time.monotonic() - t0
        timed_out = rc == -signal.SIGKILL and seconds >= limit - 1
        detail = f"rc {rc}, {seconds:.0f} s" + (" (killed at its time limit)" if timed_out else "")
        return self.note(name, rc == 0, detail, rc=rc, seconds=round(seconds, 1))

    def write(self, path: Path, **extra: object) -> None:
        write_atomic(path, json.dumps({"phases": self.records, **extra}, indent=1))

"""The GPU benchmark's device script (benchmarks/device.py), rehearsed on this CPU.

The rehearsal is the real script with CPU stand-ins (demo model, ort-cpu, diffusers
fp32 on the CPU), so a run on the GPU machine only swaps the backend: every phase the
device runs must pass here, and what comes back must fit the device's limits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import device_kit as kit

REPO = Path(__file__).resolve().parent.parent


def test_rehearsal_runs_every_phase(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "benchmarks.device", "rehearse", "--state",
                        str(tmp_path / "state"), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("device run (rehearsal): all ok; pndm: ours"), last
    summary = json.loads((out / "summary.json").read_text())
    ok = {p["phase"]: p["ok"] for p in summary["phases"]}
    for phase in ("provider", "prepare/export", "prepare/build", "engines-check", "bench-pndm",
                  "gpu-tests", "bench-euler", "spread"):
        assert ok.get(phase) is True, (phase, summary["phases"])
    have_kit = (REPO / kit.KIT).is_dir()
    assert ok["parts"] is (True if have_kit else None)
    for name in ("pndm", "euler"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["ours"]["returncode"] == 0 and result["diffusers"]["returncode"] == 0
        assert result["settings"]["scheduler"] == name
        assert result["closeness"]["max_abs"] <= 2  # ort-cpu vs diffusers fp32: parity bound
    spread = json.loads((out / "spread.json").read_text())
    assert spread["low"] == "bfloat16" and set(spread["by_steps"]) == {"3"}
    # what the device sends back: at most 8 files, plain names, no folders
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files


def test_split_and_assemble_round_trip(tmp_path):
    """Parts of a real xz tar stream join back; a missing part is named."""
    src = tmp_path / "src" / "ortgpu"
    src.mkdir(parents=True)
    wheel = src / "onnxruntime_gpu-1.30.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    import zipfile

    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("onnxruntime/capi/libonnxruntime_providers_cuda.so", b"\0" * 5000)
    stream = tmp_path / "s.tar.xz"
    subprocess.run(f"tar -C {src.parent} -cf - ortgpu | xz -0 > {stream}", shell=True, check=True)
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    parts = kit.split_stream(stream, parts_dir, 3)
    assert [p.name for p in parts] == kit.part_names(3)
    assert b"".join(p.read_bytes() for p in parts) == stream.read_bytes()
    assert kit.assemble(parts_dir, tmp_path / "joined").name == wheel.name
    parts[1].unlink()
    with pytest.raises(RuntimeError, match="ort-part-01-of-03"):
        kit.assemble(parts_dir, tmp_path / "joined2")


def test_steps_stop_a_phase_at_its_limit(tmp_path):
    steps = kit.Steps(tmp_path / "log")
    rec = steps.run("sleepy", [sys.executable, "-c", "import time; print('hi'); time.sleep(60)"], 11)
    assert rec["ok"] is False and "killed at its time limit" in rec["detail"]
    assert "sleepy| hi" in (tmp_path / "log").read_text()
    steps.deadline = 0.0  # long past: nothing more starts
    assert steps.run("late", [sys.executable, "-c", "pass"], 60)["detail"] == "no time left"


def test_gpu_plan_fits_the_device():
    """Every file the GPU run sends back comes back (8 at most), every benchmark command
    parses, and each call's carry fits in 64 MiB with the working tree."""
    from benchmarks import device_plan as dp
    from benchmarks.run import parse_args

    assert len(dp.BENCHES) + len(dp.OTHER_FILES_BACK) <= dp.MAX_FILES_BACK
    run = dp.Run(dp.GPU, Path("/tmp/x"), REPO)
    for name, scheduler, extra in dp.BENCHES:
        cmd = dp.bench_cmd(run, name, scheduler, extra)
        assert cmd[1:3] == ["-m", "benchmarks.run"]
        settings, args = parse_args(cmd[3:])
        assert (settings.steps, settings.backend, args.name) == (50, "ort-cuda", name)
    kit_dir = REPO / kit.KIT
    if not kit_dir.is_dir():
        pytest.skip("no .devicekit here (python -m benchmarks.device pack makes it)")
    wheels = sum(p.stat().st_size for p in (kit_dir / "wheels").glob("*.whl"))
    biggest = max(p.stat().st_size for p in kit_dir.glob("ort-part-*"))
    assert kit.tree_bytes(REPO) + wheels + biggest <= kit.PART_LIMIT


def test_a_cold_machine_is_reported_at_once(tmp_path):
    """A call that lands on a fresh machine (the 30 s window was missed) says so and
    exits 1 instead of waiting minutes for a prepare that is not there."""
    from benchmarks import device
    from benchmarks.device_plan import CPU, Run

    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "ort-part-02-of-05").write_bytes(b"x")
    run = Run(CPU, tmp_path / "state", REPO)
    assert device.part(run, carried, wait=300) == 1
    assert device.missing_earlier_parts(run, carried) == ["ort-part-00-of-05", "ort-part-01-of-05"]
    out = tmp_path / "out"
    assert device.finish(run, carried, out) == 1
    assert json.loads((out / "summary.json").read_text())["stopped"].startswith("the machine went cold")


def test_start_refuses_while_an_earlier_prepare_runs(tmp_path):
    import os

    from benchmarks import device
    from benchmarks.device_plan import CPU, Run

    run = Run(CPU, tmp_path, REPO)
    (tmp_path / "prepare.pid").write_text(str(os.getpid()))  # alive: this process
    assert device.start(run, tmp_path / "none") == 1

"""The benchmark harness runs end to end on the demo bundle with tiny settings and writes
its three files. Timings are never asserted; only that they are there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from runtime.bundle import demo_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    """The shipped demo bundle, or one exported now if this checkout has none yet."""
    if (demo_bundle() / "manifest.json").is_file():
        return "demo"
    out = tmp_path_factory.mktemp("demo") / "bundle"
    subprocess.run([sys.executable, "-m", "export", "--model", "demo", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="module")
def written(bundle, tmp_path_factory) -> tuple[dict, str, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-m", "benchmarks.run", "--model", bundle, "--steps", "2",
           "--height", "64", "--width", "64", "--warmup", "1", "--runs", "1",
           "--throughput-batches", "1,2", "--throughput-warmup", "0", "--out", str(out),
           "--name", "tiny"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "tiny.json").read_text()), (out / "tiny.md").read_text(), out, proc


def test_json_has_machine_settings_and_every_figure(written):
    r = written[0]
    assert {"machine", "settings", "build", "ours", "diffusers", "closeness", "baseline"} <= set(r)
    assert r["machine"]["cpu"] and r["machine"]["cpu_cores"] >= 1
    assert "onnxruntime" in r["machine"]["packages"] and "torch" in r["machine"]["packages"]
    assert r["settings"]["steps"] == 2 and r["settings"]["height"] == 64
    for side in ("ours", "diffusers"):
        d = r[side]
        assert d["returncode"] == 0
        for stage in ("text_encoder", "unet_step", "denoise", "host_overhead_step",
                      "vae_decoder", "safety_checker", "total"):
            assert {"p50", "p90", "min", "n"} <= set(d["stages"][stage]), (side, stage)
        assert d["unet_calls_per_image"] == 3  # PNDM: steps + 1 calls
        assert d["peak_rss"] > 0 and d["cold_start_seconds"] > 0 and d["load_seconds"] > 0
        assert set(d["throughput"]) == {"1", "2"}
        assert all("images_per_s" in v or "skipped" in v for v in d["throughput"].values())
    assert r["build"]["load_seconds"] > 0 and "unet" in r["build"]["graphs"]
    assert r["diffusers"]["weights"]["hash_matches_manifest"] is True
    # 8x8 latents (1 KiB) cannot be told from bookkeeping: test_loop_buffers.py checks
    # the loop at 256x256
    assert r["ours"]["alloc"]["array_bytes_per_step_max"] is None
    # from the LoadReport: the benchmark builds the CPU-fused graphs first (engines.build)
    assert r["build"]["graphs"]["unet"]["cache"] == "built from the CPU-fused graph"
    c = r["closeness"]
    # ours (ort-cpu fp32) against diffusers fp32 on the same seed: the parity tolerance
    assert c["shape"] == [1, 64, 64, 3] and c["max_abs"] <= 2, c


def test_markdown_table(written):
    md = written[1]
    assert md.startswith("# ")
    assert "| stage | ours p50 |" in md and "| End to end, one call |" in md
    assert "| Cold start: process start to first image |" in md
    assert "| Throughput, batch 2 |" in md
    assert "2 steps only" in md and "Estimated end to end at 50 steps" in md
    assert "Host overhead per UNet step" in md


def test_chart_is_a_readable_png(written):
    from PIL import Image

    with Image.open(written[2] / "tiny.png") as im:
        im.load()
        assert im.format == "PNG" and im.width > 300 and im.height > 100


def test_progress_goes_to_stderr(written):
    err = written[3].stderr
    assert "[ours] warm-up 1/1" in err and "[diffusers] run 1/1" in err
    assert "wrote " in err and "| stage |" in written[3].stdout


def test_lora_swap_benchmark_runs_on_the_demo(tmp_path, capsys):
    """benchmarks.lora_swap makes its LoRA files from the bundle's name map and reports
    each swap's time and RSS (the committed full-size result comes from the same code)."""
    import json

    from benchmarks.lora_swap import main

    assert main(["--model", "demo", "--rank", "2", "--size", "64", "--step-size", "64",
                 "--step-calls", "3", "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["layers"] == 84 and r["rank"] == 2
    for k in ("cold_load_s", "swap_A_s", "swap_B_s", "swap_A_again_s", "swap_none_s",
              "unet_call_bundle_s", "unet_call_lora_ready_s", "peak_rss_after_A_gib"):
        assert r[k] > 0, k
    assert r["rss_none_gib"] > 0 and r["swap_vs_cold_load"] > 0
    assert r["peak_rss_after_none_gib"] >= r["peak_rss_after_A_gib"]  # VmHWM only grows


def test_the_serving_load_test_runs_and_reports_every_figure(tmp_path):
    """benchmarks.serve, tiny: two phases of 2 s and the overload burst (Ray Serve)."""
    pytest.importorskip("ray.serve")
    from benchmarks import serve as bench

    out = tmp_path / "serve.json"
    assert bench.main(["--seconds", "2", "--steps", "2", "--size", "64", "--clients", "2",
                       "--max-batch", "2", "--max-queued", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for phase in ("batching", "one_at_a_time"):
        assert r[phase]["images_per_s"] > 0 and r[phase]["failed"] == {}, r[phase]
        assert r[phase]["latency_p99_s"] >= r[phase]["latency_p50_s"] > 0
    assert r["overload"]["status"].get("503", 0) >= 1 and r["overload"]["retry_after_on_every_503"]
    assert set(r["overload"]["status"]) <= {"200", "503"}
    assert r["throughput_ratio"] > 0

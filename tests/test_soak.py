"""The soak script: its growth, slope and verdict on synthetic RSS series (a leak cannot be
forced on a real run), and a short real run on the demo bundle whose report is checked
for shape and sanity, never for timings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import soak

MIB = 2**20


def series(n: int, every: int, leak_per_gen: float, noise: float = 0.0, base: int = 200 * MIB,
           seed: int = 0) -> tuple[list[int], list[int]]:
    gens = list(range(0, n + 1, every))
    jitter = np.random.default_rng(seed).normal(0, noise, len(gens))
    return gens, [int(base + leak_per_gen * g + e) for g, e in zip(gens, jitter, strict=True)]


def test_flat_noisy_series_passes():
    s = soak.summarize(*series(1000, 10, 0, noise=64 * 2**10), seconds=10.0)
    ok, line = soak.verdict(s, 1.0)
    assert ok and line.startswith("PASS")
    assert abs(s["growth_pct"]) < 0.2 and abs(s["slope_pct_per_1000"]) < 0.1
    assert s["generations"] == 1000 and s["samples"] == 101 and s["generations_per_s"] == 100.0
    assert s["max_rss"] >= max(s["baseline_rss"], s["final_rss"])


def test_steady_leak_fails_with_its_slope():
    leak = 0.02 * 200 * MIB / 1000  # bytes per generation: 2% of 200 MiB per 1,000
    s = soak.summarize(*series(1000, 10, leak), seconds=10.0)
    assert s["slope_bytes_per_1000"] == pytest.approx(1000 * leak, rel=1e-5)
    assert s["slope_pct_per_1000"] == pytest.approx(2.0, rel=1e-3)
    assert s["growth_pct"] == pytest.approx(2.0, rel=1e-3)
    ok, line = soak.verdict(s, 1.0)
    assert not ok and line.startswith("FAIL") and "end-point growth" in line and "fitted growth" in line
    assert soak.verdict(s, 3.0)[0]


def test_leak_hidden_at_the_end_points_fails_on_the_fit():
    gens, rss = series(1000, 10, 3 * 2**10)  # 1.5% over the run ...
    rss[-1] = rss[0]  # ... but the last sample happens to read the baseline
    s = soak.summarize(gens, rss, seconds=10.0)
    assert s["growth_pct"] == 0
    ok, line = soak.verdict(s, 1.0)
    assert not ok and "fitted growth" in line and "end-point growth" not in line


def test_shrinking_rss_and_a_single_sample_pass():
    assert soak.verdict(soak.summarize(*series(500, 10, -2 * 2**10), seconds=1.0), 1.0)[0]
    s = soak.summarize([0], [100 * MIB], seconds=0.0)
    assert s["slope_bytes_per_1000"] == 0 and s["growth_pct"] == 0 and s["generations_per_s"] is None


def test_prompts_differ_per_generation():
    assert len({soak.prompt_for(i) for i in range(100)}) == 100


def test_bad_arguments_are_refused():
    for argv in (["--n", "0"], ["--every", "0"], ["--warmup", "-1"], ["--max-growth", "-1"]):
        with pytest.raises(SystemExit) as e:
            soak.parse_args(argv)
        assert e.value.code == 2


def test_short_soak_on_the_demo_bundle(tmp_path, capsys):
    out = tmp_path / "soak.json"
    rc = soak.main(["--model", "demo", "--n", "30", "--warmup", "5", "--every", "5", "--size", "64",
                    "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == (0 if r["passed"] else 1)
    s = r["summary"]
    assert s["generations"] == 30 and s["samples"] == 7 and s["generations_per_s"] > 0
    assert r["samples"]["generations"] == [0, 5, 10, 15, 20, 25, 30]
    assert len(r["samples"]["rss"]) == len(r["samples"]["seconds"]) == 7
    assert 10 * MIB < s["baseline_rss"] <= s["max_rss"] <= r["peak_rss"]
    assert s["final_rss"] <= s["max_rss"]
    assert abs(s["growth_pct"]) < 5  # 30 generations of a tiny model: anything near this is a bug
    assert r["machine"]["cpu"] and r["settings"]["n"] == 30 and r["backend"]
    assert set(r["rss_split"]["final"]) == {"anon", "file"}
    printed = capsys.readouterr().out
    assert r["machine"]["cpu"] in printed and r["verdict"] in printed


def test_a_size_the_model_cannot_run_is_a_usage_error(capsys):
    assert soak.main(["--n", "1", "--warmup", "0", "--size", "60"]) == 2
    assert "multiple of 8" in capsys.readouterr().err

"""The three outputs of a benchmark: JSON (everything), a markdown table, a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path

# (key in a worker's "stages", row label); p50/p90/min of each
STAGE_ROWS = (
    ("text_encoder", "Text encoder (prompt + negative prompt)"),
    ("unet_step", "UNet, one call"),
    ("denoise", "Denoising loop, all calls"),
    ("host_overhead_step", "Host overhead per step (step time - UNet time)"),
    ("loop_overhead_step", "Loop overhead per step incl. setup ((loop - UNet) / calls)"),
    ("vae_decoder", "VAE decode"),
    ("safety_checker", "Safety checker (incl. CLIP preprocessing)"),
    ("total", "End to end, one call"),
)
CHART_ROWS = ("text_encoder", "unet_step", "denoise", "vae_decoder", "safety_checker", "total")
HOST_OVERHEAD_TARGET = 0.2e-3  # seconds per step at 64x64 latents (issue 6)
E2E_TARGET = 1.3  # ORT CPU end to end vs diffusers eager on the same CPU
GPU_E2E_TARGET = 1.5  # on a GPU, vs diffusers fp16 (SDPA) on the same GPU (issue 11)
GPU_SECONDS_TARGET = 0.35  # 512x512, 50 steps, CFG, batch 1 on an H100/H200 (issue 11)
CPU_UNET_TARGETS = (2.5, 1.25)  # UNet per call vs diffusers fp32, bf16 on the same CPU (issue 10)
H100_FLOOR = 0.10  # s per 512x512 / 50 steps / CFG image (DESIGN.md physical reference)


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.0f} µs"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def fmt_bytes(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "-"


def _stage(side: dict, key: str) -> dict:
    return (side or {}).get("stages", {}).get(key, {})


def estimate_50_steps(side: dict, calls_50: int) -> float | None:
    """text + calls_50 x (loop time per call) + VAE + safety, from this run's p50s."""
    st = (side or {}).get("stages", {})
    calls = (side or {}).get("unet_calls_per_image")
    if not st or not calls or "denoise" not in st:
        return None
    fixed = st["total"]["p50"] - st["denoise"]["p50"]
    return fixed + st["denoise"]["p50"] / calls * calls_50


def model_label(r: dict) -> str:
    """The source model's name (demo, sd14-random) when the bundle was exported from one."""
    src = (r.get("bundle") or {}).get("source", {}).get("model")
    return src if src in ("demo", "sd14-random") else Path(r["settings"]["model"]).name


def weights(ours: dict, base: dict) -> str:
    w = base.get("weights") or {}
    text = f"bundle {(ours.get('weights') or {}).get('bundle', '-')}"
    if w:
        same = "match" if w.get("hash_matches_manifest") else "DO NOT match"
        built = " (built from the seed: diffusers' load is random init, not a checkpoint read)" \
            if w["source"] in ("demo", "sd14-random") else ""
        text += (f"; diffusers from export's loader: {w['source']}, seed {w['seed']}{built}; "
                 f"its weights {same} the manifest's source hash")
    return text


def markdown(r: dict) -> str:
    s, m, ours, base = r["settings"], r["machine"], r.get("ours") or {}, r.get("diffusers") or {}
    calls = ours.get("unet_calls_per_image") or base.get("unet_calls_per_image")
    lines = [
        f"# {model_label(r)}: {s['backend']} {ours_precision(r)}vs diffusers ({r['baseline']}), "
        f"{m['name']}",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores, {fmt_bytes(m.get('memory_bytes'))} RAM"
        + (f"; GPU {m['gpus'][0]['name']}" if m["gpus"] else "; no GPU"),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"- Load average (1/5/15 min) before the run {m.get('load_average_at_start')}, after it "
        f"{r.get('load_average_at_end')}, on {m['cpu_cores']} cores (load before the run is other "
        f"work sharing the machine)",
        f"- Settings: {s['width']}x{s['height']}, {s['steps']} steps {s['scheduler']} "
        f"({calls} UNet calls), guidance {s['guidance_scale']:g}, batch {s['batch_size']}, "
        f"seed {s['seed']}, safety checker {'on' if s['safety'] else 'off'}; "
        f"{s['warmup']} warm-up + {s['runs']} timed runs per side, each side in its own process",
        f"- Weights: {weights(ours, base)} (source hash "
        f"{(r.get('bundle') or {}).get('source', {}).get('hash', '-')[:12]})",
        f"- Date: {r['created']}; command: `{r['command']}`",
    ]
    if s["steps"] != 50:
        lines.append(f"- **{s['steps']} steps only**: per-step figures are what this run measures; "
                     f"the 50-step row is an estimate from them")
    lines += ["", "| stage | ours p50 | ours p90 | ours min | diffusers p50 | diffusers p90 | "
              "diffusers min | ours better by |", "|---|---|---|---|---|---|---|---|"]
    for key, label in STAGE_ROWS:
        a, b = _stage(ours, key), _stage(base, key)
        if not a and not b:
            continue
        lines.append(f"| {label} | {fmt_s(a.get('p50'))} | {fmt_s(a.get('p90'))} | "
                     f"{fmt_s(a.get('min'))} | {fmt_s(b.get('p50'))} | {fmt_s(b.get('p90'))} | "
                     f"{fmt_s(b.get('min'))} | {ratio(b.get('p50'), a.get('p50'))} |")
    if s["steps"] != 50 and calls:
        calls_50 = calls + 50 - s["steps"]
        a, b = estimate_50_steps(ours, calls_50), estimate_50_steps(base, calls_50)
        lines.append(f"| *Estimated end to end at 50 steps ({calls_50} calls)* | {fmt_s(a)} | | | "
                     f"{fmt_s(b)} | | | {ratio(b, a)} |")
    one = [
        ("Load (ours: engines from the cache or compiled; diffusers: building the modules)",
         ours.get("load_seconds"),
         base.get("load_seconds"), fmt_s),
        ("Cold start: process start to first image", ours.get("cold_start_seconds"),
         base.get("cold_start_seconds"), fmt_s),
        (f"Peak RSS, batch {s['batch_size']}", ours.get("peak_rss"), base.get("peak_rss"), fmt_bytes),
        ("RSS after the timed runs: allocated (RssAnon)", (ours.get("rss_after_runs") or {}).get("anon"),
         (base.get("rss_after_runs") or {}).get("anon"), fmt_bytes),
        ("RSS after the timed runs: mapped files (RssFile)", (ours.get("rss_after_runs") or {}).get("file"),
         (base.get("rss_after_runs") or {}).get("file"), fmt_bytes),
        ("Peak device memory", ours.get("peak_device_memory"), base.get("peak_device_memory"), fmt_bytes),
    ]
    build = r.get("build") or {}
    if build.get("load_seconds"):
        one.insert(0, ("Engine build (first load, empty engine cache)",
                       build["load_seconds"] + build.get("engines_build_seconds", 0), None, fmt_s))
    lines += ["", "| one-off | ours | diffusers | ours better by |", "|---|---|---|---|"]
    for label, a, b, f in one:
        if a is None and b is None:
            continue
        lines.append(f"| {label} | {f(a)} | {f(b)} | {ratio(b, a)} |")
    for batch in s["throughput_batches"]:
        a = (ours.get("throughput") or {}).get(str(batch), {})
        b = (base.get("throughput") or {}).get(str(batch), {})
        fa = f"{a['images_per_s']:.3g} img/s" if "images_per_s" in a else a.get("skipped", "-")
        fb = f"{b['images_per_s']:.3g} img/s" if "images_per_s" in b else b.get("skipped", "-")
        lines.append(f"| Throughput, batch {batch} | {fa} | {fb} | "
                     f"{ratio(a.get('images_per_s'), b.get('images_per_s'))} |")
    lines += more_baselines(r)
    lines += ["", "Cold start is a fresh process (interpreter, imports, load, first image; the "
              "baseline's weight-hash check taken out); throughput is images per call time."]
    lines += ["", "Times are wall clock on the host" + (
        " (CUDA events where marked in the JSON)" if m["gpus"] else "") +
        "; ratios compare p50s; \"ours better by\" > 1 means ours is faster (smaller)."]
    lines += ["", "## Against the targets (reported, not asserted)", ""]
    lines += [f"- {t}" for t in targets(r)]
    return "\n".join(lines) + "\n"


def ours_precision(r: dict) -> str:
    """"bf16 " etc.: what our side ran (results before precisions existed: "")."""
    p = ((r.get("ours") or {}).get("weights") or {}).get("precision")
    return f"{p} " if p else ""


def more_baselines(r: dict) -> list[str]:
    """The same run's other diffusers baselines (--baseline-dtype a,b): the rows a
    reader compares first."""
    ours, out = r.get("ours") or {}, []
    for dtype, base in (r.get("more_baselines") or {}).items():
        out += ["", f"Against diffusers {dtype} (same run, its own process):", "",
                f"| | ours | diffusers {dtype} | ours better by |", "|---|---|---|---|"]
        for key, label in (("unet_step", "UNet, one call"), ("total", "End to end, one call")):
            a, b = _stage(ours, key).get("p50"), _stage(base, key).get("p50")
            out.append(f"| {label} (p50) | {fmt_s(a)} | {fmt_s(b)} | {ratio(b, a)} |")
        a, b = ours.get("peak_rss"), base.get("peak_rss")
        out.append(f"| Peak RSS | {fmt_bytes(a)} | {fmt_bytes(b)} | {ratio(b, a)} |")
        c = base.get("closeness")
        if c and "max_abs" in c:
            out.append(f"| Image difference to ours (max / mean, /255) | | {c['max_abs']} / "
                       f"{c['mean_abs']:.3f} | |")
    return out


def targets(r: dict) -> list[str]:
    s, ours, base = r["settings"], r.get("ours") or {}, r.get("diffusers") or {}
    out = []
    ho = _stage(ours, "host_overhead_step").get("p50")
    if ho is not None:
        h, w = s["height"] // 8, s["width"] // 8
        verdict = "met" if ho < HOST_OVERHEAD_TARGET else "missed"
        out.append(f"Host overhead per UNet step: {fmt_s(ho)} p50 at {h}x{w} latents "
                   f"(target < 0.2 ms at 64x64: {verdict})")
    alloc = ours.get("alloc")
    if alloc:
        arrays = alloc.get("array_bytes_per_step_max", alloc["bytes_per_step_max"])
        verdict = "met" if arrays == 0 else "missed" if arrays else "not measurable at this size"
        out.append(f"Array allocations in the loop: {arrays} bytes per step at most (target "
                   f"zero: {verdict}); all traced allocations, bookkeeping included: "
                   f"{alloc['bytes_per_step_p50']} bytes per step p50, "
                   f"{alloc['bytes_per_step_max']} max, freed within the step (tracemalloc; "
                   f"ORT's and OpenVINO's native arenas not seen)")
    a, b = _stage(ours, "total").get("p50"), _stage(base, "total").get("p50")
    gpu = s.get("backend") in ("ort-cuda", "tensorrt")  # GPU targets for GPU backends only
    if a and b:
        want = GPU_E2E_TARGET if gpu else E2E_TARGET
        verdict = "met" if b / a >= want else "missed"
        out.append(f"End to end vs diffusers: {b / a:.2f}x (target >= {want}x: {verdict})")
    if s.get("backend") in ("openvino", "ort-cpu"):  # issue 10's CPU targets
        baselines = {s.get("baseline_dtype", "float32"): base, **(r.get("more_baselines") or {})}
        for dtype, want in zip(("float32", "bfloat16"), CPU_UNET_TARGETS, strict=True):
            u_a = _stage(ours, "unet_step").get("p50")
            u_b = _stage(baselines.get(dtype) or {}, "unet_step").get("p50")
            if u_a and u_b:
                out.append(f"UNet per call vs diffusers {dtype}: {u_b / u_a:.2f}x (target >= "
                           f"{want}x: {'met' if u_b / u_a >= want else 'missed'})")
        pa, pb = ours.get("peak_rss"), base.get("peak_rss")
        if pa and pb:
            out.append(f"Peak RSS vs diffusers: {fmt_bytes(pa)} vs {fmt_bytes(pb)} (target <=: "
                       f"{'met' if pa <= pb else 'missed'})")
    if gpu and a and (s["height"], s["width"], s["steps"], s["batch_size"]) == (512, 512, 50, 1):
        verdict = "met" if a <= GPU_SECONDS_TARGET else "missed"
        out.append(f"End to end: {fmt_s(a)} (target <= {GPU_SECONDS_TARGET} s on an H100/H200: "
                   f"{verdict})")
    c = r.get("closeness")
    if c:
        out.append(f"Image closeness to diffusers (uint8, before the safety checker's blackout): "
                   f"max {c['max_abs']}, mean {c['mean_abs']:.4f}; NSFW flags ours "
                   f"{c['nsfw_ours']}, diffusers {c['nsfw_diffusers']}")
    if gpu and a:
        reference = (s["height"], s["width"], s["steps"], s["batch_size"]) == (512, 512, 50, 1)
        out.append(f"Physical floor (H100, 512x512, 50 steps, CFG): {H100_FLOOR} s; ours / floor = "
                   f"{a / H100_FLOOR:.1f}" + ("" if reference else " (settings differ: not comparable)"))
    return out


def chart(r: dict, path: Path) -> None:
    """Horizontal bars, log time axis: p50 per stage, ours vs diffusers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(STAGE_ROWS)
    keys = [k for k in CHART_ROWS if _stage(r.get("ours"), k) or _stage(r.get("diffusers"), k)]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(keys) + 2))
    height = 0.38
    for j, (side, color) in enumerate((("ours", "tab:blue"), ("diffusers", "tab:orange"))):
        vals = [_stage(r.get(side), k).get("p50", 0) for k in keys]
        ys = [i + (j - 0.5) * height for i in range(len(keys))]
        name = f"ours ({r['settings']['backend']})" if side == "ours" else f"diffusers ({r['baseline']})"
        ax.barh(ys, vals, height, label=name, color=color)
        for y, v in zip(ys, vals, strict=True):
            if v:
                ax.text(v, y, " " + fmt_s(v), va="center", fontsize=8)
    ax.set_yticks(range(len(keys)), [labels[k].split(" (")[0] for k in keys])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds (p50, log scale)")
    s = r["settings"]
    ax.set_title(f"{model_label(r)} {s['width']}x{s['height']}, {s['steps']} steps, "
                 f"batch {s['batch_size']} - {r['machine']['name']}", fontsize=10)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 4)  # room for the value labels
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(r: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(r, indent=1) + "\n")
    paths["md"].write_text(markdown(r))
    chart(r, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.report RESULT.json...`: rewrite their .md and .png from the JSON."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("results", nargs="+", type=Path, help="result JSON files")
    for path in ap.parse_args(argv).results:
        try:
            r = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            ap.exit(2, f"benchmarks.report: cannot read {path}: {e}\n")
        path.with_suffix(".md").write_text(markdown(r))
        chart(r, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile a bundle's graphs into cached backend artifacts for this machine.

    python -m engines.build BUNDLE --backend tensorrt [--static | --dynamic]
        [--min-size PX] [--max-size PX] [--max-batch N]
        [--min BxHxW] [--opt BxHxW] [--max BxHxW] [--workspace-gb 4] [--opt-level 3]
        [--timing-cache PATH] [--refit] [--graphs unet,vae_decoder]
        [--no-build] [--force] [--cache-dir DIR]
    python -m engines.build BUNDLE --backend ort-cuda|ort-cpu [--cache-dir DIR]

TensorRT: FP16 plans, one optimization profile each. `--dynamic` (the default) uses
the manifest's min/opt/max batch and image size unless flags override them;
`--static` builds min = opt = max at `--opt` (default: batch 1 at the manifest's
default size, i.e. 512x512 for v1.x, UNet batch 2 for guidance), the fastest plan for
that one shape; the text encoder stays dynamic (engines/shapes.py says why). Static and
dynamic plans live side by side in the cache; the runtime prefers the static plan
for exactly its shapes. ort-cuda: fp16 fused ONNX graphs; ort-cpu: fp32 graphs with
the CPU fusions (engines/ort_cuda.py).

Artifacts go to the engine cache (runtime/cache.py) under a key of graph hash, backend
and version, GPU and compute capability, precision and profile, so a plan is never
used on another GPU or TensorRT version. `--no-build` only reports and exits 2 if any
artifact is missing. Bad input and missing backends: one line on stderr, exit 2.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from engines.options import BuildOptions, TensorRTOptions
from engines.shapes import describe, graph_profile
from runtime import cache
from runtime.args import OneLineParser, first_line, usage_error
from runtime.bundle import (
    GRAPH_ORDER,
    MAX_TOKENS,
    TOKEN_TABLE,
    BundleError,
    Manifest,
    Profile,
    fit_profile,
    read_manifest,
    resolve_model,
    verify_hashes,
)

BACKENDS = ("tensorrt", "ort-cuda", "ort-cpu")
DESCRIPTION = "Compile a bundle's graphs into cached backend artifacts for this machine."


class UsageError(Exception):
    """One line for the user; the CLI exits 2."""


def _bhw(text: str, flag: str) -> tuple[int, int, int]:
    try:
        b, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{flag} wants BATCHxHEIGHTxWIDTH, e.g. 1x512x512; got {text!r}") from None
    return b, h, w


def _profile(rows: dict[str, tuple[int, int, int]],
             tokens: tuple[int, int, int] = (MAX_TOKENS,) * 3) -> Profile:
    try:
        batch, height, width = zip(rows["min"], rows["opt"], rows["max"], strict=True)
        return Profile(batch, height, width, tokens)
    except ValueError as e:
        raise UsageError(str(e)) from None


def choose_profiles(manifest: Manifest, static: bool, lo: str | None, opt: str | None,
                    hi: str | None, sizes: tuple[int | None, ...] = (None, None, None, None)
                    ) -> tuple[Profile, Profile | None]:
    """(dynamic profile, static profile or None): the manifest's profile with flag
    overrides, `sizes` = --min-size, --max-size, --max-batch, --max-tokens (pixels, images,
    text tokens; as export's, opt kept at the default size) then --min/--max/--opt as
    BATCHxHEIGHTxWIDTH; the
    bundle's default size must stay inside. Static is min = opt = max = --opt, by
    default batch 1 at the manifest's default size (512x512 for v1.x), and 77 text tokens
    (one prompt chunk: longer prompts need a dynamic plan)."""
    default = (manifest.default_height, manifest.default_width)
    p = manifest.profile
    if len(sizes) > 3 and sizes[3] is not None and sizes[3] > MAX_TOKENS == manifest.max_text_tokens:
        raise UsageError(f"this bundle's UNet takes exactly {MAX_TOKENS} text tokens (format "
                         f"1.{manifest.format_minor}); re-export it for long prompts")
    if any(v is not None for v in sizes):
        if static:
            raise UsageError("--min-size/--max-size/--max-batch/--max-tokens shape a dynamic "
                             "profile; --static builds one shape, given by --opt")
        try:
            lo_size, hi_size, batch, tokens = (*sizes, None, None, None, None)[:4]
            p = fit_profile(min(default), lo_size, hi_size, batch, base=manifest.profile,
                            max_tokens=tokens)
        except ValueError as e:
            raise UsageError(str(e)) from None
    rows = {"min": (p.batch[0], p.height[0], p.width[0]),
            "opt": (p.batch[1], p.height[1], p.width[1]),
            "max": (p.batch[2], p.height[2], p.width[2])}
    for key, text in (("min", lo), ("max", hi)):
        if text is not None:
            rows[key] = _bhw(text, f"--{key}")
    (b0, h0, w0), (b1, h1, w1), (b2, h2, w2) = rows["min"], rows["opt"], rows["max"]
    rows["opt"] = (min(max(b1, b0), b2), min(max(h1, h0), h2), min(max(w1, w0), w2))  # inside
    if static:  # --opt names the one shape; the text encoder keeps the dynamic rows
        one = _bhw(opt, "--opt") if opt else (1, *default)
        return _profile(rows, p.tokens), _profile({"min": one, "opt": one, "max": one})
    if opt is not None:
        rows["opt"] = _bhw(opt, "--opt")
    if not (rows["min"][1] <= default[0] <= rows["max"][1]
            and rows["min"][2] <= default[1] <= rows["max"][2]):
        raise UsageError(f"the profile {rows['min'][1]}x{rows['min'][2]}..{rows['max'][1]}x"
                         f"{rows['max'][2]} leaves out the bundle's default size "
                         f"{default[0]}x{default[1]}; widen --min/--max")
    return _profile(rows, p.tokens), None


def parse_args(argv: list[str] | None) -> tuple[BuildOptions, bool]:
    ap = OneLineParser(prog="python -m engines.build", description=DESCRIPTION)
    ap.add_argument("bundle", help="bundle folder, or `demo`")
    ap.add_argument("--backend", required=True, choices=BACKENDS)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--static", action="store_true", help="one fixed shape (fastest)")
    mode.add_argument("--dynamic", action="store_true", help="min/opt/max profile (default)")
    ap.add_argument("--min", help="BATCHxHEIGHTxWIDTH, e.g. 1x256x256")
    ap.add_argument("--opt", help="BATCHxHEIGHTxWIDTH, e.g. 1x512x512")
    ap.add_argument("--max", help="BATCHxHEIGHTxWIDTH, e.g. 4x768x768")
    ap.add_argument("--min-size", type=int, help="smallest image side in pixels (both sides)")
    ap.add_argument("--max-size", type=int, help="largest image side in pixels, e.g. 1024")
    ap.add_argument("--max-batch", type=int, help="most images per call, e.g. 4")
    ap.add_argument("--max-tokens", type=int, help="longest prompt the UNet takes, in tokens: "
                    "77 per chunk of 75 words-pieces, e.g. 231 (default: the bundle's profile)")
    ap.add_argument("--graphs", help="comma-separated subset, e.g. unet,vae_decoder")
    ap.add_argument("--workspace-gb", type=float, help="TensorRT tactic memory limit (GiB)")
    ap.add_argument("--opt-level", type=int, choices=range(6), metavar="0-5",
                    help="TensorRT builder optimization level (default 3)")
    ap.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file to reuse")
    ap.add_argument("--refit", action="store_true", help="build refittable TensorRT plans "
                    "(run-time LoRAs; the text encoder also keeps 256 token-table rows for "
                    "embeddings, its grown graph stored beside the plan; needs onnx)")
    ap.add_argument("--no-build", action="store_true", help="only report what is cached")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--cache-dir", type=Path, help=f"default ${cache.CACHE_ENV} or "
                    "~/.cache/sdrt/engines")
    ap.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    a = ap.parse_args(argv)

    bundle = resolve_model(a.bundle)
    try:
        manifest = read_manifest(bundle)
    except BundleError as e:
        raise UsageError(str(e)) from None
    graphs = tuple(g for g in GRAPH_ORDER if g in manifest.graphs)
    if a.graphs:
        wanted = tuple(g.strip() for g in a.graphs.split(",") if g.strip())
        unknown = [g for g in wanted if g not in manifest.graphs]
        if unknown:
            raise UsageError(f"--graphs: {', '.join(unknown)} not in the bundle "
                             f"(it has {', '.join(graphs)})")
        graphs = tuple(g for g in graphs if g in wanted)
    if a.workspace_gb is not None and a.workspace_gb <= 0:
        raise UsageError("--workspace-gb must be positive")
    profile, static = choose_profiles(manifest, a.static, a.min, a.opt, a.max,
                                      (a.min_size, a.max_size, a.max_batch, a.max_tokens))
    opts = BuildOptions(
        bundle=bundle, backend=a.backend, graphs=graphs, profile=profile, static=static,
        cache_dir=a.cache_dir, no_build=a.no_build, force=a.force,
        tensorrt=TensorRTOptions(a.workspace_gb, a.opt_level, a.timing_cache, a.refit))
    return opts, a.verbose


# --- backends: each returns [(graph, key, build(folder) -> main file)] ----------------

Job = tuple[str, cache.CacheKey, Callable[[Path], Path]]


def tensorrt_jobs(opts: BuildOptions, manifest: Manifest, verbose: bool) -> list[Job]:
    from runtime.cuda import Cuda, CudaError
    from runtime.tensorrt_env import available, trt_version

    why = available()
    if why:
        raise UsageError(f"cannot build TensorRT engines here: {why}")
    from engines.tensorrt_build import build_plan  # imports tensorrt

    try:
        device = Cuda().device_info()
    except CudaError as e:
        raise UsageError(f"cannot build TensorRT engines here: no usable GPU ({e})") from None
    version = trt_version()
    cache_root = opts.cache_dir or cache.default_dir()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", device.model).strip("-")  # name + SMs (Orin kinds)
    timing = opts.tensorrt.timing_cache or (
        cache_root / "tensorrt" / f"timing-{gpu}-sm{device.capability}-trt{version}.cache")
    print(f"TensorRT {version} on {device.model} (sm {device.capability}), "
          f"{describe(opts.profile, opts.static)}; timing cache {timing}")

    jobs: list[Job] = []
    for name in opts.graphs:
        entry = manifest.graphs[name]
        shapes = graph_profile(entry.spec, opts.profile, opts.static)
        onnx_path = opts.bundle / entry.file
        table = (entry.weights or {}).get(TOKEN_TABLE)
        # refittable text encoder: rows kept after the token table for embeddings
        rows = cache.TABLE_ROWS if opts.tensorrt.refit and table and not table.transposed else 0
        if rows and not opts.no_build and importlib.util.find_spec("onnx") is None:
            raise UsageError("a refittable text encoder keeps rows for embeddings in its graph, "
                             "which needs the onnx package: pip install 'sdrt[lora]'")

        def build(folder: Path, onnx_path: Path = onnx_path, shapes: dict = shapes,
                  name: str = name, rows: int = rows,
                  init: str = table.initializer if table else "") -> Path:
            out = folder / f"{name}.plan"
            if not rows:
                build_plan(onnx_path, out, shapes, opts.tensorrt, timing, verbose)
                return out
            from engines.table_rows import with_table_rows

            # the grown graph stays beside the plan: TensorRT 10's OnnxParserRefitter reads
            # the weights of the graph a plan was built from (the bundle's has fewer rows)
            grown = with_table_rows(onnx_path, init, rows, folder / onnx_path.name)
            print(f"{name}: {rows} token-table rows kept for textual-inversion embeddings")
            build_plan(grown, out, shapes, opts.tensorrt, timing, verbose)
            return out

        jobs.append((name, cache.tensorrt_key(entry, shapes, version, device,
                                              opts.tensorrt.key(rows)), build))
    return jobs


def ort_jobs(opts: BuildOptions, manifest: Manifest) -> list[Job]:
    """ort-cuda: fp16 fused graphs; ort-cpu: fp32 graphs with the CPU fusions (the
    runtime's ort-cpu backend prefers them when cached). Both device independent."""
    try:
        import onnx  # noqa: F401  (the optimizer needs it)
        import onnxruntime
        from onnxruntime.transformers import optimizer  # noqa: F401
    except ImportError as e:
        raise UsageError(f"cannot build ONNX Runtime graphs here: {e.name} is not installed "
                         f"(pip install onnx onnxruntime)") from None
    from engines.ort_cuda import optimize_fp16, optimize_fp32_cpu

    cpu = opts.backend == "ort-cpu"
    if cpu:
        print(f"onnxruntime {onnxruntime.__version__} transformers optimizer, fp32, CPU fusions")
    else:
        providers = onnxruntime.get_available_providers()
        where = "CUDA available" if "CUDAExecutionProvider" in providers else "no CUDA here; " \
            "the graphs are device independent and run wherever onnxruntime-gpu does"
        print(f"onnxruntime {onnxruntime.__version__} transformers optimizer, fp16 ({where})")
    optimize = optimize_fp32_cpu if cpu else optimize_fp16
    jobs: list[Job] = []
    for name in opts.graphs:
        entry = manifest.graphs[name]
        onnx_path = opts.bundle / entry.file

        def build(folder: Path, onnx_path: Path = onnx_path, name: str = name,
                  external: bool = entry.external_data is not None) -> Path:
            return optimize(onnx_path, folder, name, external,
                            lambda msg: print(f"warning: {msg}", file=sys.stderr),
                            lambda msg: print(msg, flush=True))

        jobs.append((name, cache.ort_cpu_fused_key(entry, onnxruntime.__version__)
                     if cpu else cache.ort_cuda_key(entry, onnxruntime.__version__), build))
    return jobs


def _lookup(key: cache.CacheKey, cache_dir: Path | None) -> Path | None:
    """cache.lookup with its CacheWarning (a damaged artifact) printed as one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cache.CacheWarning)
        found = cache.lookup(key, cache_dir)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return found


def run(opts: BuildOptions, verbose: bool = False) -> int:
    """Build (or, with no_build, check) every requested graph; the CLI's exit code."""
    manifest = read_manifest(opts.bundle)
    jobs = (tensorrt_jobs(opts, manifest, verbose) if opts.backend == "tensorrt"
            else ort_jobs(opts, manifest))
    missing = []
    for i, (name, key, build) in enumerate(jobs, 1):
        tag = f"[{i}/{len(jobs)}] {name}"
        found = None if opts.force else _lookup(key, opts.cache_dir)
        if found is not None:
            print(f"{tag}: cached -> {found}")
            continue
        if opts.no_build:
            print(f"{tag}: not built for this machine ({key.backend} {key.backend_version}, "
                  f"{key.device}, {key.precision})")
            missing.append(name)
            continue
        try:  # the key trusts the manifest's hashes: the files must still match them
            verify_hashes(opts.bundle, manifest, only=name)
        except BundleError as e:
            raise UsageError(str(e)) from None
        print(f"{tag}: building {key.backend} {key.precision} ...", flush=True)
        start = time.perf_counter()
        meta = {"built_by": "engines.build", "options": {
            "static": opts.static.to_json() if opts.static else None,
            "profile": opts.profile.to_json(),
            "workspace_gb": opts.tensorrt.workspace_gb, "opt_level": opts.tensorrt.opt_level,
            "refit": opts.tensorrt.refit}}
        path = cache.store(key, build, opts.cache_dir, meta=meta, force=opts.force)
        print(f"{tag}: done in {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    if missing:
        print(f"engines.build: not built: {', '.join(missing)}; run without --no-build "
              f"to build them", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        opts, verbose = parse_args(argv)
        return run(opts, verbose)
    except UsageError as e:
        return usage_error(str(e))
    except Exception as e:  # a build failure: one line, never a traceback
        first = first_line(e)
        print(f"engines.build: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

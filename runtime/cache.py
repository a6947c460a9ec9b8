"""The engine cache: backend artifacts (TensorRT plans, ORT fp16 graphs, ORT's
optimized CPU graphs) keyed by everything that makes them valid, written atomically
under a lock. Every backend's key is made here (`tensorrt_key`, `ort_cuda_key`,
`ort_cpu_key`), and TensorRT's plan search (`find_plan`), so `engines` (which builds)
and `runtime` (which looks up) name an artifact the same way.

Imports neither torch nor any backend. POSIX only (fcntl), which covers Linux and Jetson.

Layout, one directory per artifact:

    CACHE/<backend>/<graph>-<digest16>/<file(s)>       e.g. tensorrt/unet-1f0c.../unet.plan
    CACHE/<backend>/<graph>-<digest16>/sidecar.json    key; size, sha256, xxh3, stamp of each file
    CACHE/<backend>/<graph>-<digest16>.lock            flock'd while one process builds it

An artifact is built in a temporary sibling directory, its sidecar written last, and
the directory renamed into place, so a crash never leaves a partial artifact that a
later lookup accepts; the next build of the same artifact removes a dead builder's
temporary folder, and runtime/cache_prune.py trims the cache. A lookup that finds a
size or hash that does not match the sidecar warns (CacheWarning) and reports a
miss, so the caller rebuilds; files unchanged since they last matched (same stamp,
runtime/integrity.py) are not hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from runtime import cpu, files, integrity
from runtime.bundle import GraphEntry, GraphSpec, is_hex

SIDECAR = "sidecar.json"
CACHE_ENV = "SDRT_CACHE_DIR"
SIDECAR_VERSION = 1
ANY = "any"  # device/capability/shapes of artifacts that do not depend on them

# per input: {"min": [...], "opt": [...], "max": [...]}, as runtime.bundle.Profile.shapes
ShapeProfile = Mapping[str, Mapping[str, list[int]]]


class Gpu(Protocol):
    """What a TensorRT plan is specific to (runtime.cuda.DeviceInfo has these)."""

    @property
    def model(self) -> str: ...  # name and SM count: "NVIDIA H100 80GB HBM3, 132 SMs"

    @property
    def capability(self) -> str: ...  # "9.0"


class CacheWarning(UserWarning):
    """A cached artifact was corrupt or unreadable and will be rebuilt."""

# zero rows a refittable TensorRT text encoder plan keeps after the bundle's token table
# (engines.build --refit; key option "rows256"): a built plan's table cannot grow, so
# textual-inversion embeddings are refitted into these (384 KiB in fp16 at C = 768)
TABLE_ROWS = 256

# What makes an ORT graph LoRA-ready (backends/ort.py builds it; its cache key says so):
# ORT's NCHWc layout pass rewrites conv weights into blocked `reorder_token_N`
# initializers; a graph that takes LoRA weights by name is optimized without it.
LORA_DISABLED_OPTIMIZERS = ["NchwcTransformer"]
# a LoRA-ready graph saves every tensor of this size on externally, under its own name
# (export/weight_map.py maps weights from this size; shape constants, smaller, must stay
# inline for ORT's shape inference); the mapped ones then become graph inputs
LORA_MIN_BYTES = 128
GROWS = "rows"  # the symbolic first axes of a LoRA-ready graph's lookup tables: rows_0 ...


@dataclass(frozen=True)
class CacheKey:
    """Everything an artifact depends on. Two keys are equal iff the artifacts are
    interchangeable; `digest` names the directory."""

    graph: str  # graph name, e.g. "unet" (for readable file names)
    graph_sha256: str  # of the .onnx, plus "+<sha>" of its external data
    backend: str  # "tensorrt" | "ort-cuda" | "ort-cpu"
    backend_version: str  # e.g. TensorRT "10.3.0", onnxruntime "1.20"
    device: str  # GPU name ("NVIDIA H100 80GB HBM3", "Orin") or ANY
    capability: str  # compute capability "9.0", "8.7", or ANY (CPU: instruction set)
    precision: str  # "fp16" | "fp32"
    shapes: str  # canonical JSON of the shape profile (see `shapes_json`) or ANY
    options: str = ANY  # build options that change the artifact (TensorRT: refit, opt level)

    @property
    def digest(self) -> str:
        fields = asdict(self)
        if self.options == ANY:  # keys from before `options` existed keep their folders
            del fields["options"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{self.graph}-{self.digest}"

    def profile(self) -> dict[str, dict[str, list[int]]] | None:
        """The shape profile back as a dict (None for ANY)."""
        return None if self.shapes == ANY else json.loads(self.shapes)


def graph_sha256(entry: GraphEntry) -> str:
    """The manifest's hash of a graph, including its external data file."""
    return entry.sha256 + (f"+{entry.external_sha256}" if entry.external_sha256 else "")


def shapes_json(profile: ShapeProfile) -> str:
    """Canonical text of a shape profile: same profile, same key."""
    norm = {name: {k: [int(v) for v in row[k]] for k in ("min", "opt", "max")}
            for name, row in profile.items()}
    return json.dumps(norm, sort_keys=True, separators=(",", ":"))


def static_profile(spec: GraphSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """min = opt = max = the given concrete input shapes (the static fast path)."""
    return {t.name: {k: list(shapes[t.name]) for k in ("min", "opt", "max")}
            for t in spec.inputs}


def covers(profile: ShapeProfile, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """True when every input shape lies within the profile's [min, max] box."""
    for name, shape in shapes.items():
        row = profile.get(name)
        if row is None or len(row["min"]) != len(shape):
            return False
        if not all(lo <= s <= hi for lo, s, hi in zip(row["min"], shape, row["max"], strict=True)):
            return False
    return True


def default_dir() -> Path:
    """$SDRT_CACHE_DIR, else $XDG_CACHE_HOME/sdrt/engines, else ~/.cache/sdrt/engines."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdrt" / "engines"


def verified_memo(bundle: Path) -> Path:
    """Where runtime.integrity.BundleCheck remembers which of a bundle's files matched
    their hashes (a bundle folder may be read-only, e.g. the demo inside the package)."""
    name = hashlib.sha256(str(Path(bundle).resolve()).encode()).hexdigest()[:16]
    return default_dir() / "verified" / f"{name}.json"


def artifact_dir(key: CacheKey, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_dir()) / key.backend / key.dirname


MAX_SIDECAR_BYTES = 1 << 20  # a few KB in practice


def _read_sidecar(folder: Path) -> dict | None:
    """The sidecar when it is a regular file of this version whose every field has the
    type `find` relies on; None otherwise (a FIFO, /dev/zero, deep nesting, a files
    entry that is not {size, sha256, ...}: a damaged entry, rebuilt)."""
    try:
        d = json.loads(files.read_small(folder / SIDECAR, MAX_SIDECAR_BYTES))
    except (OSError, ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
        return None
    if not isinstance(d, dict) or d.get("version") != SIDECAR_VERSION:
        return None
    listing = d.get("files")
    key = d.get("key")
    if (not isinstance(key, dict) or not all(isinstance(v, str) for v in key.values())
            or not isinstance(d.get("main"), str)
            or not isinstance(listing, dict)
            or not all(_entry_ok(name, f) for name, f in listing.items())):
        return None
    return d


def _entry_ok(name: object, f: object) -> bool:
    """One sidecar files entry: a plain file name (never a path out of the folder) and
    {size, sha256[, xxh3_128][, stamp]} of the right types."""
    if not (isinstance(name, str) and Path(name).name == name and name not in (".", "..")):
        return False
    if not isinstance(f, dict) or not is_hex(f.get("sha256"), 64):
        return False
    size, fast, st = f.get("size"), f.get(integrity.FAST), f.get("stamp")
    return (isinstance(size, int) and not isinstance(size, bool) and size >= 0
            and (fast is None or is_hex(fast, 32))
            and (st is None or (isinstance(st, list) and len(st) == 4
                                and all(isinstance(v, int) for v in st))))


def _check(folder: Path, side: dict, full: bool = False) -> str | None:
    """None when every file matches the sidecar, else what is wrong (one line).

    Sizes always; then a file whose stamp (runtime.integrity.stamp) is the one recorded
    when it last matched is not hashed again (`full` hashes anyway); others are hashed
    with xxh3 (0.4 s for a full-size UNet), or sha256 for an entry from before xxh3 was
    recorded, and the sidecar records what matched (best effort)."""
    changed = False
    for name, want in side["files"].items():
        path = folder / name
        try:
            st = integrity.stamp(path)
        except OSError:
            return f"{name} is missing"
        if st[0] != want["size"]:
            return f"{name} has {st[0]} bytes, expected {want['size']} (truncated?)"
        if want.get("stamp") == st and not full:
            continue
        started = time.time()
        fast = want.get(integrity.FAST)
        if fast:
            if integrity.fast_hash(path) != fast:
                return f"{name} does not match its recorded hash (damaged)"
        else:
            sha, want[integrity.FAST] = integrity.file_hashes(path)
            if sha != want["sha256"]:
                return f"{name} does not match its recorded sha256 (damaged)"
            changed = True
        if integrity.recordable(st, started):
            want["stamp"], changed = st, True
    if changed:
        with contextlib.suppress(OSError):
            files.write_atomic(folder / SIDECAR, json.dumps(side, indent=2) + "\n")
    return None


def lookup(key: CacheKey, cache_dir: Path | None = None) -> Path | None:
    """The artifact's main file when cached and intact, else None.

    A present but damaged artifact (its size or hash differs from its sidecar) warns
    with CacheWarning and returns None so the caller rebuilds it."""
    found, problem = find(key, cache_dir)
    if problem:
        warnings.warn(f"engine cache: {problem}; rebuilding it", CacheWarning, stacklevel=2)
    return found


def find(key: CacheKey, cache_dir: Path | None = None,
         full: bool = False) -> tuple[Path | None, str | None]:
    """(main file, None) when cached and intact; (None, None) when not cached; (None,
    what is wrong) when present but damaged (no valid sidecar, a size or hash that
    differs from it). `full`: hash every file even when unchanged since last checked."""
    folder = artifact_dir(key, cache_dir)
    if not folder.is_dir():
        return None, None
    side = _read_sidecar(folder)
    try:  # _read_sidecar checked the types and that every file name is plain
        same = side is not None and CacheKey(**side["key"]) == key and side["main"] in side["files"]
    except TypeError:  # key fields missing or unknown
        same = False
    if side is None or not same:
        return None, f"{folder} has no valid {SIDECAR}"
    problem = _check(folder, side, full)
    if problem:
        return None, f"{folder}: {problem}"
    _used(folder)
    return folder / side["main"], None


def artifact_options(path: Path) -> str | None:
    """The build options (CacheKey.options) of the cached artifact `path`, from its
    entry's sidecar; None when it has none."""
    side = _read_sidecar(path.parent)
    return None if side is None else side["key"].get("options", ANY)


def _used(folder: Path) -> None:
    """Mark an artifact used now (its sidecar's mtime): `prune` drops the least recently
    used first. Best effort: a read-only cache is still usable."""
    with contextlib.suppress(OSError):
        os.utime(folder / SIDECAR)


def entries(backend: str, graph: str,
            cache_dir: Path | None = None) -> Iterator[tuple[CacheKey, Path]]:
    """(key, folder) of every artifact of one graph on one backend, unverified; used to
    find a plan whose profile covers given shapes. Pass each key to `lookup` to use it."""
    root = Path(cache_dir or default_dir()) / backend
    if not root.is_dir():
        return
    for folder in sorted(root.glob(f"{graph}-*")):
        side = _read_sidecar(folder) if folder.is_dir() else None
        if side is not None:
            with contextlib.suppress(TypeError):
                yield CacheKey(**side["key"]), folder


def locked(key: CacheKey, cache_dir: Path | None = None) -> contextlib.AbstractContextManager:
    """Hold an exclusive flock on the artifact's lock file (blocks until free)."""
    return files.locked(artifact_dir(key, cache_dir).with_suffix(".lock"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _listing(path: Path) -> dict:
    sha, fast = integrity.file_hashes(path)
    return {"size": path.stat().st_size, "sha256": sha, integrity.FAST: fast}


def _remove_leftovers(final: Path) -> None:
    """Remove the temporary folders of earlier builds of this artifact (a builder killed
    mid-build leaves one as large as the graph). Called under the artifact's lock, so
    none of them belongs to a live builder."""
    for stale in final.parent.glob(f".{final.name}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def store(key: CacheKey, build: Callable[[Path], Path], cache_dir: Path | None = None,
          meta: Mapping | None = None, force: bool = False) -> Path:
    """See `_store`: the artifact's main file."""
    return _store(key, build, cache_dir, meta, force)[0]


def _store(key: CacheKey, build: Callable[[Path], Path], cache_dir: Path | None = None,
           meta: Mapping | None = None, force: bool = False) -> tuple[Path, bool]:
    """Build one artifact into the cache and return its main file.

    `build(folder)` writes the artifact's files into the empty temporary `folder` and
    returns the main one. Runs under the key's lock; if another process finished the
    same artifact while we waited, that one is returned without building again.
    `meta` (build options, timings) is recorded in the sidecar for humans; `force`
    rebuilds even an intact artifact. Returns (main file, built by this call)."""
    final = artifact_dir(key, cache_dir)
    with locked(key, cache_dir):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)  # the caller already warned
            found = None if force else lookup(key, cache_dir)
        if found is not None:
            return found, False
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key.dirname}.", dir=final.parent))
        try:
            main = build(tmp)
            listing = {p.name: _listing(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            if main.parent != tmp or main.name not in listing:
                raise ValueError(f"build for {key.dirname} returned {main}, not a file in {tmp}")
            side = {"version": SIDECAR_VERSION, "key": asdict(key), "main": main.name,
                    "files": listing, "meta": dict(meta or {})}
            (tmp / SIDECAR).write_text(json.dumps(side, indent=2) + "\n")
            for p in tmp.iterdir():
                _fsync(p)
            if final.exists():  # damaged (lookup refused it): move aside, then drop
                old = final.with_name(f".{final.name}.old.{os.getpid()}")
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)  # atomic: readers see no artifact or a whole one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    from runtime.cache_prune import enforce_cap  # it imports this module

    enforce_cap(cache_dir, keep=final)
    return final / main.name, True


def fetch(key: CacheKey, build: Callable[[Path], Path], rebuild: bool = False
          ) -> tuple[Path | None, str]:
    """(artifact, what happened) for an artifact the runtime builds on first use (ORT's
    optimized CPU graph, OpenVINO's fp16 IR): "hit", else built now ("built", or
    "rebuilt" when the caller found the cached one damaged), or (None, "off (why)") when
    the cache folder cannot be used (read-only, full): the caller runs without it. A
    rebuild does not force, so `store`'s check under the lock keeps a rebuild another
    process has just finished (reported as a hit, as is one built while we waited). A
    damaged artifact found here is "rebuilt" too."""
    try:
        found, problem = (None, None) if rebuild else find(key)
        if found is not None:
            return found, "hit"
        found, built = _store(key, build)
        if not built:
            return found, "hit"
        return found, "rebuilt" if rebuild or problem else "built"
    except OSError as e:
        return None, f"off ({e.strerror or e})"


def ort_cuda_key(entry: GraphEntry, ort_version: str | None = None) -> CacheKey:
    """Key of the fp16 fused ONNX Runtime CUDA graph of one bundle graph.

    The graph is device independent (fusions are graph rewrites; ORT's CUDA provider
    picks kernels at session start), so device, capability and shapes are ANY; the
    onnxruntime major.minor is in the key because contrib-op fusions change with it."""
    if ort_version is None:
        import onnxruntime

        ort_version = onnxruntime.__version__
    major_minor = ".".join(ort_version.split(".")[:2])
    return CacheKey(entry.spec.name, graph_sha256(entry), "ort-cuda", major_minor,
                    ANY, ANY, "fp16", ANY)


def ort_cpu_key(entry: GraphEntry, ort_version: str | None = None,
                fused: bool = False) -> CacheKey:
    """Key of ORT's saved optimized fp32 graph: hardware specific, so the ISA is in it.
    `fused`: optimized from engines.build's fused graph (ort_cpu_fused_key), not the bundle's.

    This and openvino_key's artifacts are built at load, from a bundle graph checked
    against its manifest hashes first (EngineSet's source check), so those hashes name
    them: a graph damaged or edited later fails the bundle check, never meets a stale
    artifact, and copying a bundle (new inode, ctime) keeps its artifacts."""
    if ort_version is None:
        import onnxruntime

        ort_version = onnxruntime.__version__
    return CacheKey(entry.spec.name, graph_sha256(entry), "ort-cpu", ort_version, ANY,
                    cpu.isa(), "fp32-fused" if fused else "fp32", ANY)


def ort_cpu_lora_key(entry: GraphEntry, ort_version: str | None = None) -> CacheKey:
    """Key of the optimized fp32 graph that takes LoRA weights (OrtEngine `weights`):
    ORT's optimizer without its NCHWc conv layout (which renames conv weights), then
    every mapped weight made a graph input (backends/ort.py weights_as_inputs)."""
    names = sorted(w.initializer for w in (entry.weights or {}).values())
    which = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]  # the inputs it takes
    how = (f"external>={LORA_MIN_BYTES}B; off:{','.join(LORA_DISABLED_OPTIMIZERS)}; "
           f"weights as inputs {which}; tables' first axes {GROWS}_k")
    return replace(ort_cpu_key(entry, ort_version), precision="fp32-lora", options=how)


def ort_cuda_lora_key(entry: GraphEntry, ort_version: str | None = None) -> CacheKey:
    """Key of the fp32 bundle graph with every mapped weight made a graph input, for
    run-time LoRAs on ort-cuda (no ORT optimizer run first: the CPU's fusions are not
    the CUDA provider's; the session applies its own at start). Device independent."""
    names = sorted(w.initializer for w in (entry.weights or {}).values())
    which = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return replace(ort_cuda_key(entry, ort_version), precision="fp32-lora",
                   options=f"external>={LORA_MIN_BYTES}B; weights as inputs {which}")


def ort_cpu_fused_key(entry: GraphEntry, ort_version: str | None = None) -> CacheKey:
    """Key of the fp32 graph with onnxruntime's CPU fusions (engines.build --backend
    ort-cpu, which checks the bundle's hashes before building): a graph rewrite, device
    independent, as ort_cuda_key's."""
    return replace(ort_cuda_key(entry, ort_version), backend="ort-cpu", precision="fp32-fusions")


def openvino_key(entry: GraphEntry, ov_version: str) -> CacheKey:
    """Key of the OpenVINO IR with fp16-compressed weights that the bf16 graphs compile
    from (a graph rewrite: device independent; the IR format follows OpenVINO's version).
    Built at load from a checked graph, as ort_cpu_key's."""
    return CacheKey(entry.spec.name, graph_sha256(entry), "openvino", ov_version, ANY,
                    ANY, "fp16-weights", ANY)


def tensorrt_key(entry: GraphEntry, profile: ShapeProfile, version: str, gpu: Gpu,
                 options: str = ANY) -> CacheKey:
    """Key of an FP16 plan of one graph for one TensorRT version, GPU, profile and set of
    build options (engines.build's `--refit`, `--opt-level`, `--workspace-gb`, so asking
    for other options builds another plan instead of reporting the old one cached)."""
    return CacheKey(entry.spec.name, graph_sha256(entry), "tensorrt", version,
                    gpu.model, gpu.capability, "fp16", shapes_json(profile), options)


def find_plan(entry: GraphEntry, shapes: Mapping[str, tuple[int, ...]] | None, version: str,
              gpu: Gpu, cache_dir: Path | None = None, refittable: bool = False,
              rows: int = 0) -> Path | None:
    """A cached plan for this graph, TensorRT version and GPU whose profile covers
    `shapes`: a static plan for exactly these shapes first, else the covering dynamic
    plan with the smallest max shape; among equals, one that is not refittable
    (refittable plans can be slower), then one with default options. Any build options
    are accepted (engines.build --no-build checks for the exact options asked). `shapes`
    None: any plan of this graph, the largest profile first. `refittable`: only plans
    built with --refit (run-time LoRAs); `rows`: only those keeping this many token-table
    rows for embeddings (a text encoder built with --refit). None when there is none."""
    want = tensorrt_key(entry, {}, version, gpu)
    static = shapes_json(static_profile(entry.spec, shapes)) if shapes else None
    fits = []
    for key, _ in entries("tensorrt", entry.spec.name, cache_dir):
        profile = key.profile()
        if (profile is None or key.graph_sha256 != want.graph_sha256
                or key.backend_version != version or key.device != gpu.model
                or key.capability != gpu.capability
                or (shapes is not None and not covers(profile, shapes))
                or (refittable and "refit" not in key.options)
                or (rows and f"rows{rows}" not in key.options.split("-"))):
            continue
        size = sum(math.prod(row["max"]) for row in profile.values())
        # `shapes` None (any plan): the largest first, so the shared scratch is sized for
        # what allocate() may swap to
        fits.append((key.shapes != static, size if shapes is not None else -size,
                     "refit" in key.options, key.options != ANY, key.dirname, key))
    for *_, key in sorted(fits, key=lambda f: f[:5]):
        found = lookup(key, cache_dir)
        if found is not None:
            return found
    return None

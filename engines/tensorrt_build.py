"""ONNX -> FP16 TensorRT plan through the TensorRT Python API (8.6 through 10.x).

Imports tensorrt at module level: import this only after checking
runtime.backends.tensorrt.available() (engines.build does).

Order, as TensorRT's own samples: builder -> network (explicit batch) -> OnnxParser
.parse_from_file (so the UNet's external data file beside the .onnx resolves) ->
builder config (FP16, optional REFIT, workspace pool limit, optimization level,
timing cache) -> one optimization profile -> build_serialized_network -> bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator, Mapping
from pathlib import Path

import tensorrt as trt

from engines.options import TensorRTOptions
from runtime import cache


class BuildError(RuntimeError):
    """TensorRT could not parse or build a graph; one line for the user."""


def _network_flags() -> int:
    """Explicit batch: required by 8.6, the only mode (and a deprecated flag) in 10."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    major = int(str(getattr(trt, "__version__", "10")).split(".")[0])
    return 1 << int(flag) if flag is not None and major < 10 else 0


def _parse(network: trt.INetworkDefinition, logger: trt.ILogger,
           onnx_path: Path) -> trt.OnnxParser:
    """Fill `network`; the returned parser owns the weights: keep it until the build ends."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT cannot parse {onnx_path}: "
                         f"{'; '.join(errors) or 'no details'}")
    return parser


def _profile(builder: trt.Builder, network: trt.INetworkDefinition,
             shapes: Mapping[str, Mapping[str, list[int]]]) -> trt.IOptimizationProfile:
    """One optimization profile over the inputs with dynamic axes (-1 after parsing);
    each must have a row in `shapes`. Fixed-shape inputs (the timestep [1]) need none."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tensor.shape
        if all(dims[d] >= 0 for d in range(len(dims))):
            continue
        row = shapes.get(tensor.name)
        if row is None:
            raise BuildError(f"graph input {tensor.name} has no shape profile")
        # e.g. sample: min [1,4,32,32] opt [2,4,64,64] max [8,4,128,128]
        profile.set_shape(tensor.name, trt.Dims(row["min"]), trt.Dims(row["opt"]),
                          trt.Dims(row["max"]))
    return profile


@contextlib.contextmanager
def _timing_cache_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_plan(onnx_path: Path, out: Path, shapes: Mapping[str, Mapping[str, list[int]]],
               options: TensorRTOptions, timing_cache: Path, verbose: bool = False) -> None:
    """Write the serialized FP16 plan of one ONNX graph, for the GPU this runs on, to `out`
    (straight from TensorRT's buffer: no second copy of a multi-GB plan in memory).

    `shapes`: {input: {"min","opt","max": dims}} (static when all three are equal).
    The timing cache at `timing_cache` is loaded before and merged back after the
    build (under a lock, written atomically), so later builds skip tactic timing."""
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags())
    parser = _parse(network, logger, onnx_path)

    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                     int(options.workspace_gb * (1 << 30)))
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    config.add_optimization_profile(_profile(builder, network, shapes))

    with _timing_cache_lock(timing_cache):
        seed = timing_cache.read_bytes() if timing_cache.is_file() else b""
    tcache = config.create_timing_cache(seed)
    if not config.set_timing_cache(tcache, False):  # False: refuse another GPU's cache
        tcache = config.create_timing_cache(b"")
        config.set_timing_cache(tcache, False)

    plan = builder.build_serialized_network(network, config)
    del parser  # the network's weights lived in it until here
    if plan is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name} (see its log above)")

    with _timing_cache_lock(timing_cache):  # merge with builds that finished meanwhile
        merged = config.get_timing_cache()
        if timing_cache.is_file():
            other = config.create_timing_cache(timing_cache.read_bytes())
            merged.combine(other, False)
        cache.write_atomic(timing_cache, bytes(merged.serialize()))
    with open(out, "wb") as f:
        f.write(plan)  # IHostMemory is a buffer

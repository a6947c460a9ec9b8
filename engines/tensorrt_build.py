"""ONNX -> FP16 TensorRT plan through the TensorRT Python API (8.6 through 10.x).

Imports tensorrt at module level: import this only after checking
runtime.tensorrt_env.available() (engines.build does).

Order, as TensorRT's own samples: plugins registered -> builder -> network (explicit
batch) -> OnnxParser with native InstanceNormalization -> .parse_from_file (so the
UNet's external data file beside the .onnx resolves) -> builder config (FP16, optional
REFIT, workspace pool limit, optimization level, timing cache) -> one optimization
profile -> build_serialized_network -> the plan written -> the timing cache merged.

InstanceNormalization (what the opset-17 exporter emits for every GroupNorm): TensorRT
8.6's parser maps it to the `InstanceNormalization_TRT` plugin unless the parser flag
NATIVE_INSTANCENORM is set (the default from 10.0), and the plugin exists only after
`init_libnvinfer_plugins`. We set the flag and register the plugins, as NVIDIA's
demo/Diffusion does, so SD graphs parse on 8.6 (JetPack 6.0) and the plans carry no
plugin when the flag is honoured.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import tensorrt as trt

from engines.options import TensorRTOptions
from runtime import files
from runtime.tensorrt_env import register_plugins


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
    native = getattr(getattr(trt, "OnnxParserFlag", None), "NATIVE_INSTANCENORM", None)
    if native is not None:  # 8.6: off by default (the plugin path); 10.x: already on
        parser.set_flag(native)
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


def _load_timing_cache(config: trt.IBuilderConfig, path: Path,
                       warn: Callable[[str], None]) -> bool:
    """Set the timing cache at `path` on `config`, or an empty one if the file is
    missing, unreadable, corrupt (create_timing_cache gives None) or from another
    GPU/TensorRT. True when the file was there but not usable (already warned)."""
    try:
        with files.locked(path.with_name(path.name + ".lock")):
            seed = path.read_bytes() if path.is_file() else b""
    except OSError as e:
        warn(f"timing cache {path} not read ({e.strerror or e}); timing from scratch")
        seed = b""
    tcache = config.create_timing_cache(seed) if seed else None
    if tcache is not None and config.set_timing_cache(tcache, False):  # False: no foreign one
        return False
    if seed:
        warn(f"timing cache {path} is corrupt or from another GPU/TensorRT; timing from "
             f"scratch (it is replaced after this build)")
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return bool(seed)


def _save_timing_cache(config: trt.IBuilderConfig, path: Path, warn: Callable[[str], None],
                       known_bad: bool = False) -> None:
    """Merge this build's timings with builds that finished meanwhile and write them back.
    Runs after the plan is written: a problem here costs the next build time, never
    this build."""
    try:
        with files.locked(path.with_name(path.name + ".lock")):
            merged = config.get_timing_cache()
            if path.is_file():
                other = config.create_timing_cache(path.read_bytes())
                if (other is None or not merged.combine(other, False)) and not known_bad:
                    warn(f"timing cache {path} was corrupt or foreign; replaced by this build's")
            files.write_atomic(path, bytes(merged.serialize()))
    except OSError as e:
        warn(f"timing cache {path} not saved ({e.strerror or e}); the plan is fine")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def build_plan(onnx_path: Path, out: Path, shapes: Mapping[str, Mapping[str, list[int]]],
               options: TensorRTOptions, timing_cache: Path, verbose: bool = False,
               warn: Callable[[str], None] = _warn) -> None:
    """Write the serialized FP16 plan of one ONNX graph, for the GPU this runs on, to `out`
    (straight from TensorRT's buffer: no second copy of a multi-GB plan in memory).

    `shapes`: {input: {"min","opt","max": dims}} (static when all three are equal).
    The timing cache at `timing_cache` is loaded before and merged back after the
    build (under a lock, written atomically), so later builds skip tactic timing."""
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    register_plugins()  # before parsing: a graph may still need one
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
    bad_timing = _load_timing_cache(config, timing_cache, warn)

    plan = builder.build_serialized_network(network, config)
    del parser  # the network's weights lived in it until here
    if plan is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name} (see its log above)")
    with open(out, "wb") as f:
        f.write(plan)  # IHostMemory is a buffer
    del plan
    _save_timing_cache(config, timing_cache, warn, known_bad=bad_timing)

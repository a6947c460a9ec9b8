"""Fake `tensorrt` and cuda-python runtime modules that record every call.

FakeGPU holds one call log shared by both fakes, "device memory" as numpy byte
arrays keyed by fake pointers, and real page-locked-looking host memory (ctypes
buffers), so the backend's numpy views over cudaMallocHost pointers work.

Plans are JSON: {"graph", "hidden", "profile": {input: {min,opt,max}}, "scratch",
"plugins"}. A fake execution context "runs" a graph with a simple rule per graph (e.g.
the UNet returns sample * timestep + mean(encoder_hidden_states)), so tests can check
that the right bytes travel host -> device -> host, and that CUDA graph replays see new
inputs.

The fakes are as strict as the real thing where our code could go wrong (each rule has
a test in tests/test_gpu_fakes.py that breaks it on purpose):
- CUDA capture: not on the legacy default stream (0); no cudaMalloc/cudaFree/
  cudaMallocHost/cudaFreeHost/cudaStreamSynchronize while a stream captures (the call
  fails and the capture is invalidated); a replay runs on the addresses captured, so a
  graph kept past a re-allocation computes on stale (or freed) buffers.
- cudart's last-error slot: a failed call leaves its error there until cudaGetLastError;
  TensorRT's enqueue (execute_async_v3) then fails, as TensorRT does when it finds one.
- execute_async_v3 fails unless every input shape is set, every I/O tensor has an
  address, and scratch memory of at least the engine's size is bound.
- TensorRT versions: 8.6 (context.device_memory, device_memory_size, EXPLICIT_BATCH),
  10.0 (allocation strategies, still device_memory / device_memory_size), 10.1+
  (set_device_memory(ptr, size) checked against device_memory_size_v2), 11 (no
  BuilderFlag.FP16, no device_memory_size: strongly typed only).
- The ONNX parser knows InstanceNormalization: before 10.0, without the parser flag
  NATIVE_INSTANCENORM it becomes the InstanceNormalization_TRT plugin, which must be
  registered (init_libnvinfer_plugins) to parse, and to deserialize a plan that has it.
- Timing caches: create_timing_cache gives None for bytes that are not a cache; one
  from another GPU is refused by set_timing_cache and by combine.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from runtime.bundle import graph_spec


class _Err(enum.Enum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidValue = 1
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class _Kind(enum.Enum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class _Mode(enum.Enum):
    cudaStreamCaptureModeGlobal = 0


@dataclass
class _Stream:
    handle: int

    def __int__(self) -> int:
        return self.handle


@dataclass
class _Graph:
    stream: int
    ops: list = field(default_factory=list)
    invalidated: bool = False


@dataclass
class _Props:
    name: bytes
    major: int
    minor: int
    multiProcessorCount: int = 132
    totalGlobalMem: int = 80 << 30


class FakeCudart:
    """The subset of cuda-python's runtime module the backend uses."""

    cudaError_t = _Err
    cudaMemcpyKind = _Kind
    cudaStreamCaptureMode = _Mode
    UNSAFE_IN_CAPTURE = ("cudaMalloc", "cudaFree", "cudaMallocHost", "cudaFreeHost",
                         "cudaStreamSynchronize")

    def __init__(self, gpu: FakeGPU):
        self.gpu = gpu

    def _ok(self, fn: str, *values: Any) -> tuple:
        self.gpu.log.append((fn,))
        err = self.gpu.fail.get(fn)
        if err is None and self.gpu.capturing is not None and fn in self.UNSAFE_IN_CAPTURE:
            err = "cudaErrorStreamCaptureUnsupported"  # global capture mode forbids it
            self.gpu.capturing.invalidated = True
        if err:
            self.gpu.last_error = _Err[err]
            return (_Err[err],) + tuple(None for _ in values)
        return (_Err.cudaSuccess, *values)

    def cudaGetErrorName(self, err: _Err) -> tuple:
        return (_Err.cudaSuccess, err.name.encode())

    def cudaGetLastError(self) -> tuple:
        self.gpu.log.append(("cudaGetLastError",))
        err, self.gpu.last_error = self.gpu.last_error, None
        return (err or _Err.cudaSuccess,)

    def cudaGetDevice(self) -> tuple:
        return self._ok("cudaGetDevice", 0)

    def cudaGetDeviceProperties(self, index: int) -> tuple:
        name, cc = self.gpu.device
        major, minor = cc.split(".")
        return self._ok("cudaGetDeviceProperties",
                        _Props(name.encode() + b"\0\0", int(major), int(minor)))

    def cudaMalloc(self, n: int) -> tuple:
        ptr = self.gpu.new_ptr()
        r = self._ok("cudaMalloc", ptr)
        if r[0] is _Err.cudaSuccess:
            self.gpu.device_mem[ptr] = np.zeros(n, np.uint8)
            self.gpu.mallocs += 1
        return r

    def cudaFree(self, ptr: int) -> tuple:
        r = self._ok("cudaFree")
        if r[0] is _Err.cudaSuccess:
            del self.gpu.device_mem[ptr]
        return r

    def cudaMallocHost(self, n: int) -> tuple:
        buf = ctypes.create_string_buffer(n)
        r = self._ok("cudaMallocHost", ctypes.addressof(buf))
        if r[0] is _Err.cudaSuccess:
            self.gpu.host_mem[ctypes.addressof(buf)] = buf
        return r

    def cudaFreeHost(self, ptr: int) -> tuple:
        r = self._ok("cudaFreeHost")
        if r[0] is _Err.cudaSuccess:
            del self.gpu.host_mem[ptr]
        return r

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: _Kind, stream: Any) -> tuple:
        def copy() -> None:
            if kind is _Kind.cudaMemcpyHostToDevice:
                self.gpu.device_mem[dst][:n] = np.frombuffer(ctypes.string_at(src, n), np.uint8)
            else:
                ctypes.memmove(dst, self.gpu.device_mem[src].ctypes.data, n)

        cap = self.gpu.capturing
        if cap is not None and cap.stream == int(stream):
            cap.ops.append(copy)  # a captured copy node
        else:
            copy()
        r = self._ok("cudaMemcpyAsync")
        self.gpu.log[-1] = ("cudaMemcpyAsync", kind.name[10:], dst if kind.value == 1 else src)
        return r

    def cudaStreamCreate(self) -> tuple:
        return self._ok("cudaStreamCreate", _Stream(self.gpu.new_ptr()))

    def cudaStreamSynchronize(self, stream: Any) -> tuple:
        return self._ok("cudaStreamSynchronize")

    def cudaStreamDestroy(self, stream: Any) -> tuple:
        return self._ok("cudaStreamDestroy")

    def cudaStreamBeginCapture(self, stream: Any, mode: _Mode) -> tuple:
        if int(stream) == 0:  # the legacy default stream cannot be captured
            return self._fail("cudaStreamBeginCapture", "cudaErrorStreamCaptureUnsupported")
        self.gpu.capturing = _Graph(int(stream))
        return self._ok("cudaStreamBeginCapture")

    def cudaStreamEndCapture(self, stream: Any) -> tuple:
        graph, self.gpu.capturing = self.gpu.capturing, None
        if graph is None or graph.invalidated:
            return self._fail("cudaStreamEndCapture", "cudaErrorStreamCaptureInvalidated", None)
        return self._ok("cudaStreamEndCapture", graph)

    def _fail(self, fn: str, err: str, *values: Any) -> tuple:
        self.gpu.log.append((fn,))
        self.gpu.last_error = _Err[err]
        return (_Err[err], *values)

    def cudaGraphInstantiate(self, graph: _Graph, flags: int) -> tuple:
        return self._ok("cudaGraphInstantiate", ("exec", graph))

    def cudaGraphLaunch(self, graph_exec: tuple, stream: Any) -> tuple:
        for op in graph_exec[1].ops:
            op()
        if self.gpu.sticky is not None:  # a replay touched freed memory
            return self._fail("cudaGraphLaunch", self.gpu.sticky.name)
        return self._ok("cudaGraphLaunch")

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple:
        return self._ok("cudaGraphExecDestroy")

    def cudaGraphDestroy(self, graph: Any) -> tuple:
        return self._ok("cudaGraphDestroy")


# --- tensorrt ---------------------------------------------------------------------------

class _IOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class _DataType(enum.Enum):
    FLOAT = "float32"
    INT32 = "int32"
    BOOL = "bool"
    HALF = "float16"


def _nptype(dt: _DataType) -> type:
    return np.dtype(dt.value).type


def _compute(graph: str, ins: dict[str, np.ndarray], outs: dict[str, np.ndarray],
             shift: float = 0.0) -> None:
    """What the fake engines 'compute' (simple, checkable rules). `shift`: how far a
    refit moved the plan's weights from those it was built with (0.0 when equal)."""
    if graph == "unet":  # noise_pred = sample * timestep + mean(encoder_hidden_states)
        outs["noise_pred"][...] = (ins["sample"] * ins["timestep"][0]
                                   + ins["encoder_hidden_states"].mean() + shift)
    else:
        for o in outs.values():
            o[...] = 1


class FakeContext:
    """TensorRT 10.1+: set_device_memory(ptr, size)."""

    def __init__(self, engine: FakeEngine):
        self.engine, self.gpu = engine, engine.gpu
        self.input_shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory_ptr: int | None = None
        self.device_memory_size: int | None = None  # as told by set_device_memory

    def _log(self, *entry: Any) -> None:
        self.gpu.log.append(entry)

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self._log("set_input_shape", name, tuple(shape))
        row = self.engine.profile.get(name)  # None: a fixed-shape input (timestep)
        if row is not None and not all(
                lo <= s <= hi for lo, s, hi in zip(row["min"], shape, row["max"], strict=True)):
            return False
        self.input_shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        spec = self.engine.spec
        if name in self.input_shapes:
            return self.input_shapes[name]
        if len(self.input_shapes) < len(spec.inputs):
            return tuple(-1 for _ in next(t for t in spec.outputs if t.name == name).shape)
        return spec.output_shapes(self.input_shapes)[name]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._log("set_tensor_address", name, ptr)
        self.addresses[name] = ptr
        return True

    def set_device_memory(self, ptr: int, size: int) -> None:  # TensorRT 10.1+
        self._log("set_device_memory", ptr, size)
        self.device_memory_ptr, self.device_memory_size = ptr, size

    def _ready(self) -> str | None:
        """What TensorRT would refuse to enqueue for, or None."""
        spec, need = self.engine.spec, self.engine.scratch
        unset = [t.name for t in spec.inputs if t.name not in self.input_shapes]
        unbound = [n for n in self.engine.names if n not in self.addresses]
        if unset or unbound:
            return f"input shapes {unset} / tensor addresses {unbound} not set"
        ptr = self.device_memory_ptr
        if need and (ptr is None or ptr not in self.gpu.device_mem):
            return "no scratch memory bound"
        told = self.device_memory_size
        have = self.gpu.device_mem[ptr].size if need else 0
        if need and (have < need or (told is not None and told < need)):
            return f"scratch of {told if told is not None else have} bytes, {need} needed"
        if self.gpu.last_error is not None:  # TensorRT checks cudart's error after launch
            return f"CUDA error pending from an earlier call: {self.gpu.last_error.name}"
        return None

    def execute_async_v3(self, stream: int) -> bool:
        self._log("execute_async_v3", int(stream))
        assert isinstance(stream, int), "execute_async_v3 takes an int stream handle"
        if self.gpu.fail_execute or self._ready() is not None:
            self.gpu.refused.append(self._ready() or "fail_execute")
            return False
        cap = self.gpu.capturing
        spec = self.engine.spec
        shapes = {t.name: self.get_tensor_shape(t.name) for t in (*spec.inputs, *spec.outputs)}
        op = self._op(dict(self.addresses), self.device_memory_ptr, shapes)
        if cap is not None and int(stream) == cap.stream:
            cap.ops.append(op)  # recorded, not run; a replay uses what is bound NOW
        elif cap is not None and int(stream) == 0:  # legacy stream while capturing: illegal
            cap.invalidated = True
            self.gpu.last_error = _Err.cudaErrorStreamCaptureInvalidated
            self.gpu.refused.append("enqueue on the legacy stream during a capture")
            return False
        else:
            op()  # another stream runs now, and the graph being captured stays empty
        return True

    def _op(self, addresses: dict[str, int], scratch: int | None, shapes: dict[str, tuple]):
        def run() -> None:
            mem = self.gpu.device_mem
            if any(p not in mem for p in (*addresses.values(), scratch) if p is not None):
                self.gpu.sticky = _Err.cudaErrorIllegalAddress  # a stale graph's freed buffer
                return
            spec = self.engine.spec

            def view(t):
                return mem[addresses[t.name]].view(np.dtype(t.dtype)).reshape(shapes[t.name])

            self.gpu.executed.append(spec.name)
            _compute(spec.name, {t.name: view(t) for t in spec.inputs},
                     {t.name: view(t) for t in spec.outputs}, self.engine.shift())
        return run


class FakeContextV1(FakeContext):
    """TensorRT 8.6 and 10.0: `context.device_memory = ptr` (no size), no set_device_memory."""

    def __getattribute__(self, name: str) -> Any:
        if name == "set_device_memory":
            raise AttributeError(name)
        return super().__getattribute__(name)

    @property
    def device_memory(self) -> int | None:
        return self.device_memory_ptr

    @device_memory.setter
    def device_memory(self, ptr: int) -> None:
        self._log("device_memory=", ptr)
        self.device_memory_ptr = ptr


class FakeEngine:
    def __init__(self, gpu: FakeGPU, plan: dict):
        self.gpu = gpu
        self.spec = graph_spec(plan["graph"], plan["hidden"])
        self.profile = plan["profile"]
        self.scratch = plan["scratch"]
        self.names = [t.name for t in (*self.spec.inputs, *self.spec.outputs)]
        self.refittable = bool(plan.get("refittable"))
        self.built = dict(plan.get("weights", {}))  # name -> [size, sum] as built
        self.weights = {k: list(v) for k, v in self.built.items()}  # as refitted since
        self.fused = [list(g) for g in plan.get("fused", [])]

    def shift(self) -> float:
        return float(sum(self.weights[k][1] - self.built[k][1] for k in self.built))

    def __getattr__(self, name: str) -> Any:
        v = self.gpu.trt
        if name == "device_memory_size_v2" and v >= (10, 1):
            return self.scratch
        if name == "device_memory_size" and v < (11, 0):
            if v >= (10, 1) and self.scratch == 0:
                return 1 << 30  # deprecated in 10.1+: not what the v2 API reports
            return self.scratch
        raise AttributeError(name)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> _IOMode:
        return _IOMode.INPUT if name in {t.name for t in self.spec.inputs} else _IOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> _DataType:
        t = next(t for t in (*self.spec.inputs, *self.spec.outputs) if t.name == name)
        return _DataType(t.dtype)

    def get_tensor_profile_shape(self, name: str, index: int) -> list:
        row = self.profile[name]
        return [tuple(row["min"]), tuple(row["opt"]), tuple(row["max"])]

    def create_execution_context(self, strategy: Any = None) -> FakeContext:
        self.gpu.log.append(("create_execution_context", getattr(strategy, "name", None)))
        assert self.gpu.trt >= (10, 0), "TensorRT 8.6 has no allocation strategies"
        return FakeContext(self) if self.gpu.trt >= (10, 1) else FakeContextV1(self)

    def create_execution_context_without_device_memory(self) -> FakeContext:
        self.gpu.log.append(("create_execution_context_without_device_memory",))
        return FakeContextV1(self)


class FakeRuntime:
    def __init__(self, gpu: FakeGPU, logger: Any):
        self.gpu = gpu

    def deserialize_cuda_engine(self, data: Any) -> FakeEngine | None:
        self.gpu.log.append(("deserialize_cuda_engine",))
        self.gpu.deserialized.append(data)  # what was passed: bytes, or a mapped file
        try:
            plan = json.loads(bytes(data))
            engine = FakeEngine(self.gpu, plan)
        except (ValueError, KeyError):
            return None  # as TensorRT does for a foreign or corrupt plan
        if plan.get("plugins") and not self.gpu.plugins_registered:
            return None  # "getPluginCreator could not find plugin InstanceNormalization_TRT"
        return engine


class FakeWeights:
    """trt.Weights(array): like the real one it keeps a pointer, not the array; here a
    weak reference, so weights whose array is gone by refit time are caught."""

    def __init__(self, array: np.ndarray):
        assert array.dtype == np.float32 and array.flags.c_contiguous, "float32, C order"
        self.ref, self.size = weakref.ref(array), array.size


class FakeRefitter:
    """trt.Refitter: set_named_weights by ONNX initializer name (the parser names them
    so), get_missing_weights (the weights a plan fused with those set: here every
    initializer of one node, e.g. a Conv's kernel and bias), refit_cuda_engine."""

    def __init__(self, gpu: FakeGPU, engine: FakeEngine):
        gpu.log.append(("Refitter",))
        if not engine.refittable:  # TensorRT returns no refitter; the binding raises
            raise TypeError("Refitter(): engine was not built with REFIT")
        self.gpu, self.engine = gpu, engine
        self.pending: dict[str, FakeWeights] = {}

    def set_named_weights(self, name: str, weights: FakeWeights) -> bool:
        known = self.engine.weights.get(name)
        if known is None or known[0] != weights.size:
            return False  # no such refittable weight, or another count
        self.pending[name] = weights
        return True

    def get_all_weights(self) -> list[str]:
        return list(self.engine.weights)

    def get_missing_weights(self) -> list[str]:
        return sorted({n for g in self.engine.fused if set(g) & set(self.pending)
                       for n in g if n not in self.pending})

    def refit_cuda_engine(self) -> bool:
        self.gpu.log.append(("refit_cuda_engine", sorted(self.pending)))
        if self.get_missing_weights():
            return False
        arrays = {k: w.ref() for k, w in self.pending.items()}
        assert all(a is not None for a in arrays.values()), "refit from freed host memory"
        for k, a in arrays.items():
            self.engine.weights[k] = [a.size, float(a.astype(np.float64).sum())]
        self.pending = {}
        return True


class FakeOnnxParserRefitter:
    """TensorRT 10's trt.OnnxParserRefitter: every weight of the plan from an ONNX file."""

    def __init__(self, refitter: FakeRefitter, logger: Any):
        self.refitter = refitter
        self.kept: list[np.ndarray] = []  # the real one copies; keep the arrays alive

    def refit_from_file(self, path: str) -> bool:
        self.refitter.gpu.log.append(("refit_from_file", path))
        for name, array in _initializers(path).items():
            if name in self.refitter.engine.weights:
                self.kept.append(array)
                self.refitter.set_named_weights(name, FakeWeights(array))
        return True


def _initializers(path: str) -> dict[str, np.ndarray]:
    model = onnx.load(path)  # with its external data
    return {t.name: numpy_helper.to_array(t).astype(np.float32).ravel()
            for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}


# --- builder side ------------------------------------------------------------------------

class FakeTimingCache:
    def __init__(self, gpu_name: str, entries: set[str] | None = None):
        self.gpu_name = gpu_name
        self.entries = set(entries or ())

    @staticmethod
    def parse(data: bytes, gpu_name: str) -> FakeTimingCache | None:
        if not data:
            return FakeTimingCache(gpu_name)
        try:
            d = json.loads(data)
            return FakeTimingCache(d["gpu"], set(d["entries"]))
        except (ValueError, KeyError, TypeError):
            return None  # not a timing cache

    def combine(self, other: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if other.gpu_name != self.gpu_name and not ignore_mismatch:
            return False
        self.entries |= other.entries
        return True

    def serialize(self) -> bytes:
        return json.dumps({"gpu": self.gpu_name, "entries": sorted(self.entries)}).encode()


class FakeNetwork:
    def __init__(self):
        self.inputs: list[types.SimpleNamespace] = []
        self.name = ""
        self.plugins: set[str] = set()
        self.weights: dict[str, list] = {}  # initializer -> [size, sum]
        self.fused: list[list[str]] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> types.SimpleNamespace:
        return self.inputs[i]


class FakeParser:
    def __init__(self, gpu: FakeGPU, network: FakeNetwork, logger: Any):
        self.gpu, self.network = gpu, network
        self.flags: set = set()
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def parse_from_file(self, path: str) -> bool:
        self.gpu.log.append(("parse_from_file", path))
        model = onnx.load(path)  # loads external data from beside the file, as TensorRT
        native = self.gpu.trt >= (10, 0) or _ParserFlag.NATIVE_INSTANCENORM in self.flags
        if not native and any(n.op_type == "InstanceNormalization" for n in model.graph.node):
            if not self.gpu.plugins_registered:
                self.errors.append("getPluginCreator could not find plugin "
                                   "InstanceNormalization_TRT version 1")
                return False
            self.network.plugins.add("InstanceNormalization_TRT")
        self.network.name = model.graph.name
        inits = _initializers(path)
        self.network.weights = {k: [a.size, float(a.astype(np.float64).sum())] for k, a in inits.items()}
        self.network.fused = [[i for i in n.input if i in inits] for n in model.graph.node
                              if sum(i in inits for i in n.input) > 1]
        self.network.inputs = [
            types.SimpleNamespace(name=i.name, shape=tuple(
                d.dim_value if d.HasField("dim_value") else -1
                for d in i.type.tensor_type.shape.dim))
            for i in model.graph.input]
        return True

    def get_error(self, i: int) -> str:
        return self.errors[i]


class FakeConfig:
    def __init__(self, gpu: FakeGPU):
        self.gpu = gpu
        self.flags: set = set()
        self.pool: dict = {}
        self.builder_optimization_level = 3
        self.profiles: list = []
        self.timing_cache: FakeTimingCache | None = None

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pool[pool] = size

    def add_optimization_profile(self, profile: dict) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: Any) -> FakeTimingCache | None:
        return FakeTimingCache.parse(bytes(data), self.gpu.device[0])

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.gpu_name != self.gpu.device[0] and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache:
        assert self.timing_cache is not None
        return self.timing_cache


class FakeProfile(dict):
    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}


class FakeBuilder:
    def __init__(self, gpu: FakeGPU, logger: Any):
        self.gpu = gpu

    def create_network(self, flags: int = 0) -> FakeNetwork:
        self.gpu.log.append(("create_network", flags))
        return FakeNetwork()

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig(self.gpu)

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes:
        self.gpu.builds.append({"graph": network.name, "flags": sorted(config.flags),
                                "pool": dict(config.pool),
                                "opt_level": config.builder_optimization_level,
                                "profile": config.profiles[0]})
        assert config.timing_cache is not None
        config.timing_cache.entries.add(f"{network.name}-tactics")
        plan = {"graph": network.name, "hidden": 8, "profile": config.profiles[0],
                "scratch": 1 << 20, "plugins": sorted(network.plugins)}
        if "REFIT" in config.flags:
            plan.update(refittable=True, weights=network.weights, fused=network.fused)
        return json.dumps(plan).encode()


class _ParserFlag(enum.Enum):
    NATIVE_INSTANCENORM = 0


class FakeGPU:
    """One fake GPU: `.cudart` (cuda-python runtime) and `.tensorrt` (a module)."""

    def __init__(self, trt_version: str = "10.3.0", device: tuple[str, str] = ("Fake H100", "9.0")):
        self.trt_version = trt_version
        self.trt = tuple(int(x) for x in trt_version.split(".")[:2])
        self.trt_major = self.trt[0]
        self.device = device
        self.log: list[tuple] = []
        self.device_mem: dict[int, np.ndarray] = {}
        self.host_mem: dict[int, Any] = {}
        self.fail: dict[str, str] = {}  # cudart function -> error name to return
        self.fail_execute = False
        self.capturing: _Graph | None = None
        self.last_error: _Err | None = None  # cudart's last-error slot
        self.sticky: _Err | None = None  # an error no call clears (illegal address)
        self.plugins_registered = False
        self.executed: list[str] = []
        self.deserialized: list[Any] = []
        self.refused: list[str] = []  # why execute_async_v3 returned False
        self.builds: list[dict] = []
        self.mallocs = 0
        self._next = 0x1000
        self.cudart = FakeCudart(self)
        self.tensorrt = self._module()

    def install(self, monkeypatch: Any) -> FakeGPU:
        """Make `import tensorrt` and `from cuda.bindings import runtime` find the fakes."""
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        bindings.runtime = self.cudart
        cuda.bindings = bindings
        for name, mod in (("tensorrt", self.tensorrt), ("cuda", cuda),
                          ("cuda.bindings", bindings)):
            monkeypatch.setitem(sys.modules, name, mod)
        # modules that `import tensorrt` at top level must bind this fake, not the last one
        monkeypatch.delitem(sys.modules, "engines.tensorrt_build", raising=False)
        # plugins are registered once per process; each fake GPU is a new "process"
        from runtime.tensorrt_env import register_plugins

        register_plugins.cache_clear()
        return self

    def new_ptr(self) -> int:
        self._next += 0x1000
        return self._next

    def calls(self, *names: str) -> list[tuple]:
        return [c for c in self.log if c[0] in names]

    def _register_plugins(self, logger: Any, namespace: str) -> bool:
        self.log.append(("init_libnvinfer_plugins", namespace))
        self.plugins_registered = True
        return True

    def _module(self) -> types.ModuleType:
        gpu = self
        m = types.ModuleType("tensorrt")
        m.__version__ = self.trt_version
        m.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "INFO": 3, "ERROR": 1,
                                       "__init__": lambda s, level=2: None})
        m.Runtime = lambda logger: FakeRuntime(gpu, logger)
        m.Builder = lambda logger: FakeBuilder(gpu, logger)
        m.OnnxParser = lambda network, logger: FakeParser(gpu, network, logger)
        m.OnnxParserFlag = _ParserFlag
        m.init_libnvinfer_plugins = self._register_plugins
        m.TensorIOMode = _IOMode
        m.DataType = _DataType
        m.nptype = _nptype
        m.Dims = lambda shape: tuple(shape)
        m.Weights = FakeWeights
        m.Refitter = lambda engine, logger: FakeRefitter(gpu, engine)
        if self.trt_major >= 10:
            m.OnnxParserRefitter = FakeOnnxParserRefitter
        # 11 builds strongly typed networks only: no FP16 flag
        flags = {"REFIT": "REFIT", **({"FP16": "FP16"} if self.trt_major < 11 else {})}
        m.BuilderFlag = types.SimpleNamespace(**flags)
        m.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        flags = {"EXPLICIT_BATCH": 0} if self.trt_major < 11 else {}
        m.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        if self.trt_major >= 10:
            m.ExecutionContextAllocationStrategy = enum.Enum(
                "ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")
        return m

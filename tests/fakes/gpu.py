"""Fake `tensorrt` and cuda-python runtime modules that record every call.

FakeGPU holds one call log shared by both fakes, "device memory" as numpy byte
arrays keyed by fake pointers, and real page-locked-looking host memory (ctypes
buffers), so the backend's numpy views over cudaMallocHost pointers work.

Plans are JSON: {"graph", "hidden", "profile": {input: {min,opt,max}}, "scratch"}.
A fake execution context "runs" a graph with a simple rule per graph (e.g. the UNet
returns sample * timestep + mean(encoder_hidden_states)), so tests can check that
the right bytes travel host -> device -> host, and that CUDA graph replays see new
inputs.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from runtime.bundle import graph_spec


class _Err(enum.Enum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidValue = 1
    cudaErrorStreamCaptureUnsupported = 900


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
    ops: list = field(default_factory=list)


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

    def __init__(self, gpu: FakeGPU):
        self.gpu = gpu

    def _ok(self, fn: str, *values: Any) -> tuple:
        self.gpu.log.append((fn,))
        err = self.gpu.fail.get(fn)
        if err:
            return (_Err[err],) + tuple(None for _ in values)
        return (_Err.cudaSuccess, *values)

    def cudaGetErrorName(self, err: _Err) -> tuple:
        return (_Err.cudaSuccess, err.name.encode())

    def cudaGetDevice(self) -> tuple:
        return self._ok("cudaGetDevice", 0)

    def cudaGetDeviceProperties(self, index: int) -> tuple:
        name, cc = self.gpu.device
        major, minor = cc.split(".")
        return self._ok("cudaGetDeviceProperties",
                        _Props(name.encode() + b"\0\0", int(major), int(minor)))

    def cudaMalloc(self, n: int) -> tuple:
        ptr = self.gpu.new_ptr()
        self.gpu.device_mem[ptr] = np.zeros(n, np.uint8)
        self.gpu.mallocs += 1
        return self._ok("cudaMalloc", ptr)

    def cudaFree(self, ptr: int) -> tuple:
        del self.gpu.device_mem[ptr]
        return self._ok("cudaFree")

    def cudaMallocHost(self, n: int) -> tuple:
        buf = ctypes.create_string_buffer(n)
        self.gpu.host_mem[ctypes.addressof(buf)] = buf
        return self._ok("cudaMallocHost", ctypes.addressof(buf))

    def cudaFreeHost(self, ptr: int) -> tuple:
        del self.gpu.host_mem[ptr]
        return self._ok("cudaFreeHost")

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: _Kind, stream: Any) -> tuple:
        if kind is _Kind.cudaMemcpyHostToDevice:
            self.gpu.device_mem[dst][:n] = np.frombuffer(ctypes.string_at(src, n), np.uint8)
        else:
            ctypes.memmove(dst, self.gpu.device_mem[src].ctypes.data, n)
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
        self.gpu.capturing = _Graph()
        return self._ok("cudaStreamBeginCapture")

    def cudaStreamEndCapture(self, stream: Any) -> tuple:
        graph, self.gpu.capturing = self.gpu.capturing, None
        return self._ok("cudaStreamEndCapture", graph)

    def cudaGraphInstantiate(self, graph: _Graph, flags: int) -> tuple:
        return self._ok("cudaGraphInstantiate", ("exec", graph))

    def cudaGraphLaunch(self, graph_exec: tuple, stream: Any) -> tuple:
        for op in graph_exec[1].ops:
            op()
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


def _compute(graph: str, ins: dict[str, np.ndarray], outs: dict[str, np.ndarray]) -> None:
    """What the fake engines 'compute' (simple, checkable rules)."""
    if graph == "unet":  # noise_pred = sample * timestep + mean(encoder_hidden_states)
        outs["noise_pred"][...] = (ins["sample"] * ins["timestep"][0]
                                   + ins["encoder_hidden_states"].mean())
    else:
        for o in outs.values():
            o[...] = 1


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.gpu = engine, engine.gpu
        self.input_shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory_ptr: int | None = None

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
        self.device_memory_ptr = ptr

    def execute_async_v3(self, stream: int) -> bool:
        self._log("execute_async_v3", int(stream))
        assert isinstance(stream, int), "execute_async_v3 takes an int stream handle"
        if self.gpu.fail_execute:
            return False
        assert self.device_memory_ptr is not None, "no scratch memory bound"
        op = self._run
        if self.gpu.capturing is not None:
            self.gpu.capturing.ops.append(op)  # recorded, not run (as CUDA capture)
        else:
            op()
        return True

    def _run(self) -> None:
        spec, mem = self.engine.spec, self.gpu.device_mem

        def view(t, shape):
            return mem[self.addresses[t.name]].view(np.dtype(t.dtype)).reshape(shape)

        shapes = {t.name: self.get_tensor_shape(t.name) for t in (*spec.inputs, *spec.outputs)}
        ins = {t.name: view(t, shapes[t.name]) for t in spec.inputs}
        outs = {t.name: view(t, shapes[t.name]) for t in spec.outputs}
        self.gpu.executed.append(spec.name)
        _compute(spec.name, ins, outs)


class FakeContext86(FakeContext):
    """TensorRT 8.6: `context.device_memory = ptr`, no set_device_memory."""

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
        if gpu.trt_major >= 10:
            self.device_memory_size_v2 = self.scratch

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def device_memory_size(self) -> int:
        return self.scratch

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
        return FakeContext(self)

    def create_execution_context_without_device_memory(self) -> FakeContext:
        self.gpu.log.append(("create_execution_context_without_device_memory",))
        return FakeContext86(self)


class FakeRuntime:
    def __init__(self, gpu: FakeGPU, logger: Any):
        self.gpu = gpu

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        self.gpu.log.append(("deserialize_cuda_engine",))
        try:
            return FakeEngine(self.gpu, json.loads(data))
        except (ValueError, KeyError):
            return None  # as TensorRT does for a foreign or corrupt plan


# --- builder side ------------------------------------------------------------------------

class FakeTimingCache:
    def __init__(self, data: bytes):
        self.entries = set(json.loads(data)) if data else set()

    def combine(self, other: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.entries |= other.entries
        return True

    def serialize(self) -> bytes:
        return json.dumps(sorted(self.entries)).encode()


class FakeNetwork:
    def __init__(self):
        self.inputs: list[types.SimpleNamespace] = []
        self.name = ""

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> types.SimpleNamespace:
        return self.inputs[i]


class FakeParser:
    def __init__(self, gpu: FakeGPU, network: FakeNetwork, logger: Any):
        self.gpu, self.network = gpu, network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        self.gpu.log.append(("parse_from_file", path))
        model = onnx.load(path)  # loads external data from beside the file, as TensorRT
        self.network.name = model.graph.name
        self.network.inputs = [
            types.SimpleNamespace(name=i.name, shape=tuple(
                d.dim_value if d.HasField("dim_value") else -1
                for d in i.type.tensor_type.shape.dim))
            for i in model.graph.input]
        return True

    def get_error(self, i: int) -> str:
        return "fake parse error"


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

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
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
                "scratch": 1 << 20}
        return json.dumps(plan).encode()


class FakeGPU:
    """One fake GPU: `.cudart` (cuda-python runtime) and `.tensorrt` (a module)."""

    def __init__(self, trt_version: str = "10.3.0", device: tuple[str, str] = ("Fake H100", "9.0")):
        self.trt_version = trt_version
        self.trt_major = int(trt_version.split(".")[0])
        self.device = device
        self.log: list[tuple] = []
        self.device_mem: dict[int, np.ndarray] = {}
        self.host_mem: dict[int, Any] = {}
        self.fail: dict[str, str] = {}  # cudart function -> error name to return
        self.fail_execute = False
        self.capturing: _Graph | None = None
        self.executed: list[str] = []
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
        return self

    def new_ptr(self) -> int:
        self._next += 0x1000
        return self._next

    def calls(self, *names: str) -> list[tuple]:
        return [c for c in self.log if c[0] in names]

    def _module(self) -> types.ModuleType:
        gpu = self
        m = types.ModuleType("tensorrt")
        m.__version__ = self.trt_version
        m.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "INFO": 3, "ERROR": 1,
                                       "__init__": lambda s, level=2: None})
        m.Runtime = lambda logger: FakeRuntime(gpu, logger)
        m.Builder = lambda logger: FakeBuilder(gpu, logger)
        m.OnnxParser = lambda network, logger: FakeParser(gpu, network, logger)
        m.TensorIOMode = _IOMode
        m.DataType = _DataType
        m.nptype = _nptype
        m.Dims = lambda shape: tuple(shape)
        m.BuilderFlag = types.SimpleNamespace(FP16="FP16", REFIT="REFIT")
        m.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        flags = {"EXPLICIT_BATCH": 0} if self.trt_major < 11 else {}
        m.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        if self.trt_major >= 10:
            m.ExecutionContextAllocationStrategy = enum.Enum(
                "ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")
        return m

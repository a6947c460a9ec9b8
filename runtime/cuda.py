"""A small checked wrapper over cuda-python's runtime API for the TensorRT backend.

cuda-python moved its runtime module: `cuda.bindings.runtime` (12.6+ and 13.x) and
`cuda.cudart` (12.0-12.5, what JetPack 6 users often have). Both are accepted.
Every call goes through `Cuda.call`, which unpacks cuda-python's `(err, *values)`
tuples and raises CudaError naming the call and the CUDA error.

Lifecycle: one Cuda per process, one Stream per runtime; device buffers (cudaMalloc)
and pinned host arrays (cudaMallocHost, so async copies are truly async) are
allocated once per shape by the engine and freed in its release().
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and the error."""


def runtime_module() -> Any:
    """The cudart module of whichever cuda-python is installed (ImportError if none)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6, 13.x

        return runtime
    except ImportError:
        from cuda import cudart  # cuda-python 12.0-12.5

        return cudart


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str  # "NVIDIA H100 80GB HBM3", "Orin"
    capability: str  # "9.0", "8.7"
    sm_count: int  # streaming multiprocessors: tells an AGX Orin from an Orin Nano
    total_memory: int  # bytes

    @property
    def model(self) -> str:
        """What a TensorRT plan is specific to besides the compute capability: the name
        and SM count (Jetson Orin modules all call themselves "Orin"; TensorRT warns
        against moving plans between device models)."""
        return f"{self.name}, {self.sm_count} SMs"


class Cuda:
    """cudart plus checked calls. `rt` may be injected (tests pass a fake)."""

    def __init__(self, rt: Any = None):
        self.rt = rt if rt is not None else runtime_module()

    def call(self, fn: str, *args: Any) -> Any:
        """rt.fn(*args) -> its one value (or tuple of values, or None); raise on error."""
        result = getattr(self.rt, fn)(*args)
        err, values = result[0], tuple(result[1:])
        if err != self.rt.cudaError_t.cudaSuccess:
            raise CudaError(f"{fn} failed: {self.error_name(err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def error_name(self, err: Any) -> str:
        try:
            name = self.rt.cudaGetErrorName(err)[1]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # a broken driver must not hide the original error
            return str(err)

    def device_info(self, index: int | None = None) -> DeviceInfo:
        if index is None:
            index = int(self.call("cudaGetDevice"))
        props = self.call("cudaGetDeviceProperties", index)
        name = props.name
        if isinstance(name, bytes):
            name = name.split(b"\0", 1)[0].decode(errors="replace")
        return DeviceInfo(index, str(name).strip(), f"{props.major}.{props.minor}",
                          int(props.multiProcessorCount), int(props.totalGlobalMem))

    # --- memory ---------------------------------------------------------------------

    def malloc(self, nbytes: int) -> int:
        return int(self.call("cudaMalloc", max(1, nbytes)))

    def free(self, ptr: int) -> None:
        self.call("cudaFree", ptr)

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, np.ndarray]:
        """(pointer, array viewing page-locked host memory of that shape and dtype)."""
        count = math.prod(shape)
        nbytes = max(1, count * dtype.itemsize)
        ptr = int(self.call("cudaMallocHost", nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        return ptr, np.frombuffer(memoryview(raw).cast("B"), dtype, count=count).reshape(shape)

    def free_pinned(self, ptr: int) -> None:
        self.call("cudaFreeHost", ptr)

    def h2d(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)

    def d2h(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)

    # --- streams and graphs ---------------------------------------------------------

    def stream(self) -> Any:
        return self.call("cudaStreamCreate")

    def sync(self, stream: Any) -> None:
        self.call("cudaStreamSynchronize", stream)

    def destroy_stream(self, stream: Any) -> None:
        self.call("cudaStreamDestroy", stream)

    def begin_capture(self, stream: Any) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self.call("cudaStreamBeginCapture", stream, mode)

    def end_capture(self, stream: Any) -> Any:
        """The captured cudaGraph_t."""
        return self.call("cudaStreamEndCapture", stream)

    def abort_capture(self, stream: Any) -> None:
        """End a capture that failed half way so the stream is usable again."""
        try:
            graph = self.end_capture(stream)
            if graph is not None:
                self.call("cudaGraphDestroy", graph)
        except CudaError:
            pass

    def clear_last_error(self) -> None:
        """Reset cudart's last-error slot (cudaGetLastError), e.g. after a failed capture
        that we recovered from, so a later check does not report it again."""
        self.rt.cudaGetLastError()

    def instantiate(self, graph: Any) -> Any:
        return self.call("cudaGraphInstantiate", graph, 0)

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self.call("cudaGraphLaunch", graph_exec, stream)

    def destroy_graph(self, graph: Any, graph_exec: Any) -> None:
        if graph_exec is not None:
            self.call("cudaGraphExecDestroy", graph_exec)
        if graph is not None:
            self.call("cudaGraphDestroy", graph)


def stream_handle(stream: Any) -> int:
    """The integer cudaStream_t TensorRT's execute_async_v3 takes."""
    return int(stream)

"""The device side of the `ort-cuda` backend: buffers in GPU memory, CUDA graphs.

Inputs AND outputs live in device OrtValues bound once per set of shapes, so ONNX
Runtime's CUDA graph (provider option `enable_cuda_graph`) can replay a captured run:
a replay needs every I/O tensor at the address it was captured with. ONNX Runtime
captures one graph per `gpu_graph_id` (run option), so each new set of shapes gets
the next id and its own buffers, kept for the engine's life (up to `max_graphs` sets;
after that a binding without a graph), as onnxruntime's own GpuBindingManager does
(onnxruntime/transformers/io_binding_helper.py).

Per run: inputs host -> device (`OrtValue.update_inplace`), the run (or replay),
outputs device -> preallocated host arrays through cudart's cudaMemcpy (the library
ONNX Runtime's CUDA provider already loaded), so a step allocates nothing. Where
cudart cannot be found the copy goes through `OrtValue.numpy()` (one allocation).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping

import numpy as np
import onnxruntime as ort

from runtime.bundle import GraphSpec

MAX_GRAPHS = 4  # captured shape sets per engine, by default (each pins its buffers)
_D2H = 2  # cudaMemcpyDeviceToHost
_CUDART = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")

Memcpy = Callable[[int, int, int, int], int]  # cudaMemcpy(dst, src, nbytes, kind) -> error


def provider_options(cuda_graph: bool, device_id: int = 0) -> dict[str, str]:
    """As onnxruntime's Stable Diffusion tool (CudaSession.get_cuda_provider_options)."""
    return {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested",
            "enable_cuda_graph": "1" if cuda_graph else "0"}


def loaded_cudart() -> Memcpy | None:
    """cudaMemcpy of the cudart ONNX Runtime's CUDA provider loaded, or None.

    RTLD_NOLOAD: only a library already in the process, so this never picks a second,
    different CUDA runtime than the one ONNX Runtime runs on."""
    for name in _CUDART:
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        fn = lib.cudaMemcpy
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    return None


class DeviceBinding:
    """Device buffers for one set of input shapes, bound to the session.

    `graph_id` >= 0: ONNX Runtime captures this binding's run as CUDA graph `graph_id`
    (after its warm-up runs) and replays it; -1: a plain run."""

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec,
                 shapes: Mapping[str, tuple[int, ...]], graph_id: int, memcpy: Memcpy | None,
                 device: str = "cuda", weights: Mapping[str, ort.OrtValue] | None = None):
        self.shapes = dict(shapes)
        self.graph_id = graph_id
        self.memcpy = memcpy
        self.io = session.io_binding()
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.inputs: dict[str, ort.OrtValue] = {}
        self.device_outputs: dict[str, ort.OrtValue] = {}
        self.outputs: dict[str, np.ndarray] = {}  # host copies run() returns
        for name, value in (weights or {}).items():  # a LoRA-ready graph's weight inputs
            self.io.bind_ortvalue_input(name, value)
        for t in spec.inputs:
            buf = ort.OrtValue.ortvalue_from_shape_and_type(shapes[t.name], np.dtype(t.dtype), device, 0)
            self.io.bind_ortvalue_input(t.name, buf)
            self.inputs[t.name] = buf
        for name, shape in spec.output_shapes(shapes).items():
            dtype = np.dtype(next(t.dtype for t in spec.outputs if t.name == name))
            buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
            self.io.bind_ortvalue_output(name, buf)
            self.device_outputs[name] = buf
            self.outputs[name] = np.zeros(shape, dtype)

    def copy_in(self, name: str, array: np.ndarray) -> None:
        self.inputs[name].update_inplace(np.ascontiguousarray(array))  # same address

    def run(self, session: ort.InferenceSession) -> dict[str, np.ndarray]:
        # Run() ends with the CUDA provider's OnRunEnd(sync_stream=true), a
        # cudaStreamSynchronize (unless the run option disable_synchronize_execution_providers
        # is set, which we never set), so the copies below see finished outputs. The GPU
        # tests check the values after replays.
        session.run_with_iobinding(self.io, self.run_options)
        for name, host in self.outputs.items():
            dev = self.device_outputs[name]
            if self.memcpy is None:
                np.copyto(host, dev.numpy())
                continue
            err = self.memcpy(host.ctypes.data, dev.data_ptr(), host.nbytes, _D2H)
            if err:
                raise RuntimeError(f"cudaMemcpy of output {name} failed (CUDA error {err})")
        return self.outputs


class DeviceBindings:
    """DeviceBinding per set of shapes: a CUDA graph each for the first `max_graphs` sets
    (when the session has graphs on), one plain binding, replaced, for any others.
    `device` "cpu" runs the same bookkeeping on a CPU session (the CPU tests do)."""

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec, cuda_graph: bool,
                 device: str = "cuda", max_graphs: int = MAX_GRAPHS,
                 weights: Mapping[str, ort.OrtValue] | None = None):
        self.session, self.spec, self.cuda_graph, self.device = session, spec, cuda_graph, device
        # bound to every binding: shared, one copy on the device
        self.weights: dict[str, ort.OrtValue] = dict(weights or {})
        self.max_graphs = max_graphs
        self.memcpy = loaded_cudart() if device == "cuda" else None
        self.graphs: list[DeviceBinding] = []
        self.plain: DeviceBinding | None = None

    def replace_weight(self, name: str, array: np.ndarray) -> None:
        """Weight input `name` in a new device buffer of another shape (a token table grown
        by textual inversion, [V + k, C]): the bindings made so far point at the old one,
        so they go and the next get() binds the new. Not under CUDA graphs: a new binding
        would reuse a graph id whose capture replays the old addresses."""
        if name not in self.weights:
            raise KeyError(f"no weight input {name}")
        if self.cuda_graph:
            raise ValueError("a weight's shape cannot change under CUDA graphs")
        # uploaded first: if that fails (device memory), nothing has changed
        new = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
        self.graphs, self.plain = [], None  # the old buffer is freed with its bindings
        self.weights[name] = new

    def get(self, shapes: Mapping[str, tuple[int, ...]]) -> DeviceBinding:
        shapes = dict(shapes)
        for b in self.graphs:
            if b.shapes == shapes:
                return b
        if self.cuda_graph and len(self.graphs) < self.max_graphs:
            b = DeviceBinding(self.session, self.spec, shapes, len(self.graphs), self.memcpy,
                              self.device, self.weights)
            self.graphs.append(b)
            return b
        if self.plain is None or self.plain.shapes != shapes:
            self.plain = None  # free the old buffers before allocating new ones
            self.plain = DeviceBinding(self.session, self.spec, shapes, -1, self.memcpy, self.device,
                                       self.weights)
        return self.plain

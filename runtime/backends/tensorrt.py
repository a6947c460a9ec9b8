"""TensorRT backend: FP16 plans run through the name-based tensor API on one CUDA stream.

Works with TensorRT 8.6 (JetPack 6) through 10.x (runtime/tensorrt_env.py refuses the
rest); where the API changed, features are detected, not version-parsed:
  context without its own activation memory:
      10.x  engine.create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)
      8.6   engine.create_execution_context_without_device_memory()
  its size / how to hand it over:
      10.1+      engine.device_memory_size_v2, context.set_device_memory(ptr, size)
      8.6, 10.0  engine.device_memory_size,    context.device_memory = ptr
Plugins are registered before any plan is deserialized (a plan built on 8.6 without
the native InstanceNormalization flag contains one), and plans are memory-mapped
rather than read into Python bytes.

Lifecycle (runtime.engine): several engines share one TensorRTDevice (stream, runtime,
scratch). load() every engine first, so the shared scratch is sized to the largest,
then allocate(shapes) -> set_constant / run -> release(); the device last.

    device = TensorRTDevice()                              # one per pipeline
    unet = CachedTensorRTEngine(manifest.graphs["unet"], manifest.profile, device,
                                cuda_graph=True)           # tensorrt_cached.py
    unet.load(); unet.allocate({"sample": (2, 4, 64, 64), ...})
    unet.set_constant("encoder_hidden_states", ehs)       # [2B, 77, 768] f32, once
    out = unet.run({"sample": x, "timestep": t})         # aliases pinned host buffers
    unet.release(); device.release()

TensorRTEngine(spec, plan_path, device) does the same for a plan file you name.
Arrays returned by run() live in pinned host memory owned by the engine: they are
overwritten by the next run() and freed by allocate() with new shapes and release().

run() copies the changed inputs host -> device, executes (or replays its CUDA graph),
copies the outputs device -> host and synchronizes the stream once.
"""

from __future__ import annotations

import json
import math
import mmap
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime import cache
from runtime.args import first_line
from runtime.bundle import GraphSpec
from runtime.cuda import Cuda, CudaError, stream_handle
from runtime.engine import Engine, EngineError
from runtime.tensorrt_env import register_plugins, trt_module, trt_version

if TYPE_CHECKING:
    import tensorrt as trt


# --- one stream, one runtime, one scratch allocation for all engines ------------------

class TensorRTDevice:
    """What the engines of one pipeline share: the CUDA stream they run on in turn, the
    TensorRT runtime, and one activation ("scratch") allocation sized to the largest
    engine. Safe to share because the engines run one at a time on one stream."""

    def __init__(self, cuda: Cuda | None = None, log_level: str = "WARNING"):
        trt_module()  # ImportError unless the real TensorRT is here
        import tensorrt as trt

        self.cuda = cuda or Cuda()
        self.info = self.cuda.device_info()
        self.logger = trt.Logger(getattr(trt.Logger, log_level))
        # before any deserialize: a plan may use a TensorRT plugin
        # (InstanceNormalization_TRT in plans built on 8.6 without the native flag)
        register_plugins()
        self.runtime = trt.Runtime(self.logger)
        self.stream = self.cuda.stream()
        self.scratch_need = 0  # bytes: max over loaded engines
        self.scratch_ptr = 0
        self.scratch_size = 0
        self.scratch_generation = 0  # bumped on reallocation: contexts must re-bind

    def reserve(self, nbytes: int) -> None:
        self.scratch_need = max(self.scratch_need, nbytes)

    def scratch(self) -> tuple[int, int, int]:
        """(pointer, size, generation), growing the allocation if an engine needs more."""
        if self.scratch_need > self.scratch_size:
            if self.scratch_ptr:
                self.cuda.sync(self.stream)  # no engine may still be using the old one
                self.cuda.free(self.scratch_ptr)
                self.scratch_ptr = 0
            self.scratch_ptr = self.cuda.malloc(self.scratch_need)
            self.scratch_size = self.scratch_need
            self.scratch_generation += 1
        return self.scratch_ptr, self.scratch_size, self.scratch_generation

    def release(self) -> None:
        if self.scratch_ptr:
            self.cuda.free(self.scratch_ptr)
            self.scratch_ptr, self.scratch_size = 0, 0
        if self.stream is not None:
            self.cuda.destroy_stream(self.stream)
            self.stream = None


def _dims(d: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple (Dims behaves like one, its stubs do not say so)."""
    return tuple(int(d[i]) for i in range(len(d)))


@dataclass
class _Buffer:
    """One I/O tensor: device memory and its pinned host mirror, same shape and dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype
    device: int  # device pointer
    host_ptr: int
    host: np.ndarray  # view of pinned host memory

    @property
    def nbytes(self) -> int:
        return self.host.nbytes


class TensorRTEngine(Engine):
    """One deserialized plan, its execution context, its I/O buffers and CUDA graph."""

    backend = "tensorrt"

    def __init__(self, spec: GraphSpec, path: Path, device: TensorRTDevice | None = None,
                 cuda_graph: bool = False):
        super().__init__(spec, path)
        self.device = device
        self.owns_device = device is None
        self.cuda_graph = cuda_graph
        self.engine: trt.ICudaEngine | None = None
        self.context: trt.IExecutionContext | None = None
        self.scratch_bytes = 0
        self.bound_generation = -1  # scratch generation bound to the context
        self.buffers: dict[str, _Buffer] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self.graph: Any = None  # cudaGraph_t / cudaGraphExec_t for self.shapes
        self.graph_exec: Any = None

    # --- load --------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            if self.device is None:
                self.device = TensorRTDevice()
            self._check_sidecar(self.device)
            engine = self._deserialize(self.device)
        except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
            raise self.error(f"cannot read plan {self.path}: {getattr(e, 'strerror', None) or e}"
                             ) from None
        except (CudaError, ImportError) as e:
            raise self.error(str(e)) from None
        if engine is None:
            raise self.error(f"TensorRT could not deserialize {self.path} (corrupt, or built "
                             f"for another TensorRT version or GPU); rebuild it with `python -m "
                             f"engines.build BUNDLE --backend tensorrt`")
        self.engine = engine
        self._check_io(engine)
        self.context = self._create_context(engine)
        # 10.1+: _v2 (includes weight-streaming scratch; 0 is a valid size); 8.6/10.0: v1
        self.scratch_bytes = int(engine.device_memory_size_v2
                                 if hasattr(engine, "device_memory_size_v2")
                                 else engine.device_memory_size)
        self.device.reserve(self.scratch_bytes)

    def _deserialize(self, device: TensorRTDevice) -> trt.ICudaEngine | None:
        """The plan mapped, not read into Python bytes, so a multi-GB plan is not held
        twice in host memory while TensorRT deserializes it (Jetson: CPU and GPU share
        DRAM). Cached plans are replaced atomically, never truncated in place."""
        with open(self.path, "rb") as f:
            try:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError:  # a filesystem without mmap: read it
                return device.runtime.deserialize_cuda_engine(f.read())
            with m:
                return device.runtime.deserialize_cuda_engine(m)

    def _check_sidecar(self, device: TensorRTDevice) -> None:
        """Refuse a cached plan whose sidecar names another TensorRT version or GPU."""
        side = self.path.parent / cache.SIDECAR
        if not side.is_file():
            return
        try:
            key = json.loads(side.read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # not ours to judge; TensorRT checks the plan itself
        here = (trt_version(), device.info.model, device.info.capability)
        built = (key.get("backend_version"), key.get("device"), key.get("capability"))
        if key.get("backend") == "tensorrt" and built != here:
            raise self.error(f"plan {self.path} was built with TensorRT {built[0]} for "
                             f"{built[1]} (sm {built[2]}); this is TensorRT {here[0]} on "
                             f"{here[1]} (sm {here[2]}): rebuild it with `python -m "
                             f"engines.build BUNDLE --backend tensorrt`")

    def _check_io(self, engine: trt.ICudaEngine) -> None:
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.check_io([n for n in names if is_input[n]], [n for n in names if not is_input[n]],
                      what="plan")
        for t in (*self.spec.inputs, *self.spec.outputs):
            got = np.dtype(trt.nptype(engine.get_tensor_dtype(t.name)))
            if got != np.dtype(t.dtype):
                raise self.error(f"plan tensor {t.name} is {got}, the spec says {t.dtype}")

    def _create_context(self, engine: trt.ICudaEngine) -> trt.IExecutionContext:
        import tensorrt as trt

        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:  # TensorRT 10
            context = engine.create_execution_context(strategy.USER_MANAGED)
        else:  # TensorRT 8.6
            context = engine.create_execution_context_without_device_memory()
        if context is None:
            raise self.error("TensorRT could not create an execution context")
        return context

    # --- allocate ------------------------------------------------------------------------

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        if self.engine is None or self.context is None or self.device is None:
            raise self.error("allocate() after release()", shapes)
        self._drop_graph()
        self._free_buffers()
        context, cuda = self.context, self.device.cuda
        try:
            for t in self.spec.inputs:  # every input shape first: outputs depend on them
                if not context.set_input_shape(t.name, shapes[t.name]):
                    raise self.error(self._profile_hint(t.name, shapes[t.name]), shapes)
            for t in (*self.spec.inputs, *self.spec.outputs):
                shape = _dims(context.get_tensor_shape(t.name))
                if any(d < 0 for d in shape):
                    raise self.error(f"TensorRT left {t.name} unresolved {list(shape)}", shapes)
                dtype = np.dtype(t.dtype)
                nbytes = math.prod(shape) * dtype.itemsize
                dev = cuda.malloc(nbytes)
                host_ptr, host = cuda.pinned(shape, dtype)
                self.buffers[t.name] = _Buffer(shape, dtype, dev, host_ptr, host)
                if not context.set_tensor_address(t.name, dev):  # after every shape is set
                    raise self.error(f"set_tensor_address({t.name}) failed", shapes)
            self._bind_scratch(self.device, context)
        except CudaError as e:
            self._free_buffers()
            raise self.error(str(e), shapes) from None
        self.outputs = {t.name: self.buffers[t.name].host for t in self.spec.outputs}

    def _profile_hint(self, name: str, shape: tuple[int, ...]) -> str:
        assert self.engine is not None
        try:
            lo, _, hi = (list(_dims(d)) for d in self.engine.get_tensor_profile_shape(name, 0))
        except Exception:  # a fixed-shape input has no profile: say what it is
            fixed = list(_dims(self.engine.get_tensor_shape(name)))
            return f"input {name} {list(shape)} does not fit the plan's fixed shape {fixed}"
        return (f"input {name} {list(shape)} is outside the plan's profile min {lo} max {hi}; "
                f"rebuild with `python -m engines.build BUNDLE --backend tensorrt` and a "
                f"profile that covers it (--min-size/--max-size/--max-batch)")

    # --- run ------------------------------------------------------------------------------

    def set_constant(self, name: str, array: np.ndarray) -> None:
        super().set_constant(name, array)
        assert self.device is not None
        try:
            self.device.cuda.sync(self.device.stream)  # the pinned copy may be reused now
        except CudaError as e:
            raise self.error(str(e)) from None

    def _copy_in(self, name: str, array: np.ndarray) -> None:
        """Into the pinned mirror, then host -> device on the stream."""
        assert self.device is not None
        buf = self.buffers[name]
        np.copyto(buf.host, array)
        try:
            self.device.cuda.h2d(buf.device, buf.host_ptr, buf.nbytes, self.device.stream)
        except CudaError as e:
            raise self.error(str(e)) from None

    def _run(self) -> dict[str, np.ndarray]:
        device, context = self.device, self.context
        assert device is not None and context is not None
        try:
            self._bind_scratch(device, context)
            stream = stream_handle(device.stream)
            if self.graph_exec is not None:
                device.cuda.launch(self.graph_exec, device.stream)
            else:
                if not context.execute_async_v3(stream):
                    raise self.error("execute_async_v3 failed")
                if self.cuda_graph:  # capture after one plain run (TensorRT's advice)
                    self._capture(device, context, stream)
            for t in self.spec.outputs:  # device -> host, on the stream
                buf = self.buffers[t.name]
                device.cuda.d2h(buf.host_ptr, buf.device, buf.nbytes, device.stream)
            device.cuda.sync(device.stream)  # the one sync point of a run
        except CudaError as e:
            raise self.error(str(e)) from None
        return self.outputs

    def _bind_scratch(self, device: TensorRTDevice, context: trt.IExecutionContext) -> None:
        ptr, size, generation = device.scratch()
        if generation == self.bound_generation:
            return
        self._drop_graph()  # a captured graph holds the old scratch address
        if hasattr(context, "set_device_memory"):  # TensorRT 10.1+
            context.set_device_memory(ptr, size)
        else:  # TensorRT 8.6 / 10.0
            setattr(context, "device_memory", ptr)  # noqa: B010 (absent from 10.x stubs)
        self.bound_generation = generation

    def _capture(self, device: TensorRTDevice, context: trt.IExecutionContext,
                 stream: int) -> None:
        """Record one execute_async_v3 into a CUDA graph for self.shapes. Capture is an
        optimization: when this plan or driver cannot be captured, warn once, abort the
        capture and keep running without graphs (this run's outputs are already made)."""
        cuda = device.cuda
        cuda.begin_capture(device.stream)
        try:
            if not context.execute_async_v3(stream):
                raise CudaError("execute_async_v3 returned False while capturing")
            self.graph = cuda.end_capture(device.stream)
            self.graph_exec = cuda.instantiate(self.graph)
        except Exception as e:  # CudaError, or TensorRT refusing to enqueue while capturing
            if self.graph is None:
                cuda.abort_capture(device.stream)
            self._drop_graph()
            cuda.clear_last_error()  # else the next call's error check reports it
            self.cuda_graph = False
            warnings.warn(f"tensorrt engine {self.name!r}: CUDA graph capture failed at shapes "
                          f"{self.shapes} ({e}); running without CUDA graphs",
                          RuntimeWarning, stacklevel=3)

    # --- refit (LoRA) --------------------------------------------------------------------

    def refit(self, weights: dict[str, np.ndarray],
              more: Callable[[str], np.ndarray | None] | None = None,
              onnx: Path | Callable[[], Path] | None = None,
              keep: Mapping[str, np.ndarray] | None = None) -> None:
        """Write `weights` (ONNX initializer name -> float32 array, the bundle's layout)
        into the loaded plan (built with `engines.build --refit`). Weights TensorRT fused
        with them and so wants too come from `more(name)` (None: not known); past that,
        every weight is read from the graph the plan was built from, `onnx` (or what it
        returns, called then), once
        (TensorRT 10's OnnxParserRefitter), then `keep` (what the plan holds now that
        differs from that graph: earlier refits) and ours over them. EngineError (one
        line) when the plan cannot take them; a refit TensorRT gave up on halfway leaves
        the plan as read from its file again (its own weights)."""
        import tensorrt as trt

        if self.engine is None or self.device is None:
            raise self.error("refit() before load()")
        if not getattr(self.engine, "refittable", False):
            raise self.error(f"plan {self.path.name} is not refittable: build refittable plans "
                             f"with `python -m engines.build BUNDLE --backend tensorrt --refit`")
        self.device.cuda.sync(self.device.stream)  # no run of the old weights still queued
        kept: list[np.ndarray] = []  # trt.Weights points into these: alive until refitted
        readers: list[Any] = []  # a parser refitter holds what it read: alive likewise
        try:
            refitter = trt.Refitter(self.engine, self.device.logger)

            def put(name: str, array: np.ndarray) -> None:
                a = np.ascontiguousarray(array, np.float32)
                kept.append(a)
                if not refitter.set_named_weights(name, trt.Weights(a)):
                    raise self.error(f"the plan takes no weight {name} of {a.size} values "
                                     f"(not refittable, or another shape)")

            given = dict(weights)
            for name, array in given.items():
                put(name, array)
            for _ in range(8):  # what TensorRT fused with those given; a round may add more
                missing = [n for n in refitter.get_missing_weights() if n not in given]
                if not missing:
                    break
                found = {n: more(n) if more is not None and n else None for n in missing}
                unknown = [n or "(unnamed)" for n, v in found.items() if v is None]
                if unknown and not readers and onnx is not None and hasattr(trt, "OnnxParserRefitter"):
                    graph = onnx() if callable(onnx) else onnx
                    reader = trt.OnnxParserRefitter(refitter, self.device.logger)
                    readers.append(reader)
                    if not reader.refit_from_file(str(graph)):
                        why = str(reader.get_error(0)) if getattr(reader, "num_errors", 0) else ""
                        raise self.error(f"TensorRT could not read the weights of {graph}"
                                         + (f": {why.splitlines()[0]}" if why else ""))
                    for name, array in {**(keep or {}), **given}.items():  # ours over the graph's
                        put(name, array)
                    continue
                if unknown:
                    raise self.error(f"TensorRT needs {len(unknown)} more weights to refit "
                                     f"with these (e.g. {unknown[0]}), which the bundle does not "
                                     f"map; bake the LoRAs in with `python -m export --lora`")
                for name, value in found.items():
                    assert value is not None
                    given[name] = value
                    put(name, value)
            if refitter.get_missing_weights():
                raise self.error("TensorRT still misses weights to refit with; bake the LoRAs "
                                 "in with `python -m export --lora` instead")
            if not refitter.refit_cuda_engine():  # it may have written some weights
                TensorRTEngine.reset_weights(self)  # this plan only: a cached engine's record stays
                raise self.error("TensorRT's refit failed (see its log above); the plan is "
                                 "back on its own weights")
        except EngineError:
            raise
        except (TypeError, RuntimeError, ValueError) as e:  # from the bindings
            raise self.error(f"refit failed: {first_line(e)}") from None
        finally:
            kept.clear()
            readers.clear()
        self._drop_graph()  # captured before the refit: recaptured at the next run

    def reset_weights(self) -> None:
        """The loaded plan read from its file again: its own weights, exactly."""
        self._unload()
        TensorRTEngine._load(self)

    # --- release ------------------------------------------------------------------------

    def _drop_graph(self) -> None:
        if self.device is not None and (self.graph is not None or self.graph_exec is not None):
            graph, graph_exec = self.graph, self.graph_exec
            self.graph = self.graph_exec = None
            self.device.cuda.destroy_graph(graph, graph_exec)

    def _free_buffers(self) -> None:
        if self.device is not None:
            for buf in self.buffers.values():
                self.device.cuda.free(buf.device)
                self.device.cuda.free_pinned(buf.host_ptr)
        self.buffers, self.outputs = {}, {}

    def _unload(self) -> None:
        """Free the CUDA graph, buffers, context and engine (in that order); keep the device."""
        try:
            if self.device is not None and self.device.stream is not None:
                self.device.cuda.sync(self.device.stream)
            self._drop_graph()
            self._free_buffers()
        except CudaError as e:
            raise self.error(f"release failed: {e}") from None
        finally:
            self.context = None
            self.engine = None
            self.shapes = None
            self.bound_generation = -1

    def _release(self) -> None:
        """Free everything this engine owns, in reverse order of creation. Arrays returned
        by run() point into freed pinned memory afterwards: copy them before."""
        self._unload()
        if self.owns_device and self.device is not None:
            try:
                self.device.release()
            except CudaError as e:
                raise self.error(f"release failed: {e}") from None
            self.device = None

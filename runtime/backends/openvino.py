"""OpenVINO backend (CPU): the bundle's ONNX graphs compiled per static input shape.

OpenVINO reads ONNX directly, so it runs the bundle as exported. Static shapes are what
make it fast on CPUs (its kernels and memory plan are fixed at compile time), so, as
TensorRT's plans, each set of input shapes gets its own compiled model (the graph
reshaped, then compiled), kept for the engine's life with its infer request and its
I/O tensors. Those tensors share memory with numpy arrays allocated once per shape:
inputs are copied into them, OpenVINO writes the outputs into them, nothing else is
copied or allocated per run. A LoRA swap (set_weights) drops them all: the current shapes
compile again at once, others when next used.

Precision is OpenVINO's INFERENCE_PRECISION_HINT: "bf16" (matrix units of CPUs with
AVX-512 BF16 or AMX) or "fp32".

No compiled-model cache, by measurement (full-size v1-4 UNet, 512x512, bf16, 2-core
EPYC): compiling takes about 2 s. OpenVINO's blob cache (CACHE_DIR) saved 1.9 s of a
5.2 s pipeline load but raised resident memory from 6.8 to 10.6 GiB; the exported blob
is 3.4 GB, and importing it (core.import_model from bytes) took 10.7 s and 5.4 GiB.

bf16 graphs compile from an IR with fp16-compressed weights kept in our engine cache
(`cache.openvino_key`; written once from the bundle's ONNX, 4.4 s for the UNet), not
from the fp32 ONNX: the compiled model keeps the weights it was compiled from mapped,
so the UNet alone peaked at 5.45 GiB from the ONNX (3.3 GiB of mapped fp32 weights) and
3.4 GiB from the IR, at the same speed; its output is as close to fp32 (2.0% mean
relative difference on the random-weight UNet, 2.3% from the ONNX).

Compiled models are kept per set of shapes, the least recently used dropped past
MAX_COMPILED (each bf16 UNet shape holds about 2 GiB).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime import cache
from runtime.args import first_line as _first_line
from runtime.bundle import GraphSpec
from runtime.engine import Engine, Shapes

# ours -> (INFERENCE_PRECISION_HINT to ask, the element type it reads back as)
PRECISIONS = {"fp32": ("f32", "'float32'"), "bf16": ("bf16", "'bfloat16'")}
MAX_COMPILED = 3  # shape sets kept compiled per graph (e.g. CFG on/off, one other size)


def first_line(e: BaseException) -> str:
    """OpenVINO's message without its C++ source locations ("Exception from
    src/...cpp:84:", "Check 'false' failed at ...", "Loading input model"): the line
    that says what is wrong."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))
              and ln != "Loading input model"]
    return useful[-1] if useful else _first_line(e)


def version() -> str | None:
    """OpenVINO's version, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__).split("-")[0]


class _Compiled:
    """One set of input shapes: its compiled model, request and shared I/O arrays."""

    def __init__(self, core: Any, model: Any, spec: GraphSpec, shapes: Mapping[str, tuple],
                 config: Mapping[str, str]):
        import openvino as ov

        model = model.clone()
        model.reshape({name: list(shape) for name, shape in shapes.items()})
        self.compiled = core.compile_model(model, "CPU", dict(config))
        self.request = self.compiled.create_infer_request()
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        for t in spec.inputs:
            self.inputs[t.name] = np.zeros(shapes[t.name], np.dtype(t.dtype))
            self.request.set_tensor(t.name, ov.Tensor(self.inputs[t.name], shared_memory=True))
        for name, shape in spec.output_shapes(shapes).items():
            dtype = np.dtype(next(t.dtype for t in spec.outputs if t.name == name))
            self.outputs[name] = np.zeros(shape, dtype)
            self.request.set_tensor(name, ov.Tensor(self.outputs[name], shared_memory=True))


def _only_gathered(port: Any) -> bool:
    """Whether a constant is only ever a Gather's data (through Converts: an fp16 IR),
    so it may have any number of rows."""
    targets = list(port.get_target_inputs())
    for t in targets:
        node = t.get_node()
        if node.get_type_name() == "Convert":
            if not _only_gathered(node.output(0)):
                return False
        elif node.get_type_name() != "Gather" or t.get_index() != 0:
            return False
    return bool(targets)


class OpenVinoEngine(Engine):
    """One bundle graph on OpenVINO's CPU plugin; compiled models kept per shape set."""

    backend = "openvino"

    def __init__(self, spec: GraphSpec, path: Path, precision: str = "fp32",
                 warm_shapes: Shapes | None = None, max_compiled: int = MAX_COMPILED,
                 cache_key: cache.CacheKey | None = None,
                 check_source: Callable[[], None] | None = None):
        """`warm_shapes`: compiled in load() (the shapes the first call will most likely
        use), so a graph that does not compile fails at load. `cache_key` (bf16 only):
        compile from the fp16-weight IR cached under it, written on first use, after
        `check_source` (the bundle graph's hash check) passed."""
        self.check_source = check_source
        super().__init__(spec, path)
        self.cache_key = cache_key if precision == "bf16" else None
        self.warm_shapes = warm_shapes
        self.max_compiled = max(1, max_compiled)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        self.precision = precision
        self.cache_status = "none, compiled at load"
        self.core: Any = None
        self.model: Any = None
        self.compiled: dict[tuple, _Compiled] = {}
        self.current: _Compiled | None = None
        self.compile_seconds = 0.0  # compiling, all shapes so far
        self.base_model: Any = None  # as read at load: each LoRA swap starts from a clone

    def load(self) -> None:
        super().load()
        if self.warm_shapes is not None:
            self.allocate(self.warm_shapes)

    def _load(self) -> None:
        try:
            import openvino as ov

            self.core = ov.Core()
            ir = self._cached_ir()
            try:
                self.model = self.core.read_model(str(ir or self.path))  # weights mapped
            except Exception:
                if ir is None:
                    raise
                ir = self._cached_ir(rebuild=True)  # a damaged IR of the right size
                self.model = self.core.read_model(str(ir or self.path))
            self.base_model = self.model
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise self.error(f"cannot load {self.path}: {first_line(e)}",
                             unreadable=True) from None
        self.check_io([t.get_any_name() for t in self.model.inputs],
                      [t.get_any_name() for t in self.model.outputs])

    def _cached_ir(self, rebuild: bool = False) -> Path | None:
        """The fp16-weight IR to compile from (None: the bundle's ONNX); sets cache_status."""
        if self.cache_key is None:
            return None
        found, self.cache_status = cache.fetch(self.cache_key, self._write_ir, rebuild)
        return found

    def _write_ir(self, folder: Path) -> Path:
        import openvino as ov

        out = folder / f"{self.name}.xml"  # + .bin, the weights in fp16
        if self.check_source is not None:
            self.check_source()  # the IR's key trusts the manifest's hashes
        try:
            ov.save_model(self.core.read_model(str(self.path)), str(out), compress_to_fp16=True)
        except RuntimeError as e:  # a full disk, or a graph it cannot read: no IR, the ONNX
            raise OSError(f"cannot write the fp16 IR: {first_line(e)[:120]}") from None
        return out

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        memo = tuple(sorted(shapes.items()))
        found = self.compiled.pop(memo, None)
        if found is None:
            self.current = None
            while len(self.compiled) >= self.max_compiled:  # the least recently used goes
                self.compiled.pop(next(iter(self.compiled)))
            hint, runs_as = PRECISIONS[self.precision]
            config = {"INFERENCE_PRECISION_HINT": hint,
                      "PERFORMANCE_HINT": "LATENCY"}  # one request, all cores on it
            t = time.perf_counter()
            try:
                found = _Compiled(self.core, self.model, self.spec, shapes, config)
            except Exception as e:
                raise self.error(f"cannot compile: {first_line(e)}", shapes) from None
            self.compile_seconds += time.perf_counter() - t
            # OpenVINO ignores a precision the CPU cannot run (bf16 on AVX2): never report
            # a precision that did not run
            got = str(found.compiled.get_property("INFERENCE_PRECISION_HINT"))
            if runs_as not in got:  # got reads like "<Type: 'bfloat16'>"
                raise self.error(f"asked OpenVINO for {self.precision}, it compiled {got}",
                                 shapes)
        self.compiled[memo] = found  # most recently used last
        self.current = found

    def set_weights(self, weights: dict[str, np.ndarray], keep: bool = False) -> None:
        """Run with these weights (ONNX initializer name -> float32 array in its layout:
        LoRA), consumed from the dict as they go in, and the graph's own for the rest: a
        clone of the model as loaded (its own weights, exactly, no file read), these
        constants replaced (rounded to fp16 where the IR keeps fp16), the current shapes
        compiled again now and other shapes when next used. OpenVINO cannot change a
        compiled model's weights: a swap costs a compile. {}: the graph's own. `keep`:
        the other weights as they are now (earlier set_weights kept), not the graph's own.
        A lookup table (only ever Gather's data: the token table) may get other rows
        (textual inversion, [V + k, C])."""
        import openvino as ov

        assert self.base_model is not None, "set_weights() before load()"
        model = (self.model if keep else self.base_model).clone()  # shares the constants' memory
        ports = {n: o for op in model.get_ordered_ops() for o in op.outputs() for n in o.get_names()}
        for name, value in weights.items():  # all checked before anything changes
            port = ports.get(name)
            if port is None or port.get_node().get_type_name() != "Constant":
                raise self.error(f"the graph has no weight {name}")
            shape = tuple(port.get_partial_shape().to_shape())
            rows_only = shape[1:] == value.shape[1:] and _only_gathered(port)
            if shape != value.shape and not rows_only:
                raise self.error(f"weight {name} is {list(value.shape)}, the graph's {list(shape)}")
        shapes = self.shapes
        self.compiled, self.current, self.shapes = {}, None, None  # their memory goes first
        regrown = False
        for name in list(weights):
            port = ports[name]
            half = port.get_element_type() == ov.Type.f16
            regrown |= tuple(port.get_partial_shape().to_shape()) != weights[name].shape
            stored = weights.pop(name).astype(np.float16 if half else np.float32, copy=False)
            if not np.isfinite(stored).all():
                if not keep:  # the graph's own; compiled when next used (keep: as it was)
                    self.model = self.base_model
                raise self.error(f"weight {name} overflows {stored.dtype}")
            port.replace(ov.op.Constant(stored).output(0))
            del stored
        if regrown:  # a table's new row count, on to the Gathers' outputs
            model.validate_nodes_and_infer_types()
        self.model = model
        if shapes is not None:
            self.allocate(shapes)

    def _copy_in(self, name: str, array: np.ndarray) -> None:
        assert self.current is not None
        np.copyto(self.current.inputs[name], array)

    def _run(self) -> dict[str, np.ndarray]:
        current = self.current
        assert current is not None
        try:
            # start + wait: infer() would also return a dict of output copies per run
            current.request.start_async()
            current.request.wait()
        except Exception as e:
            raise self.error(f"run failed: {first_line(e)}") from None
        return current.outputs

    def _release(self) -> None:
        self.current, self.compiled, self.model, self.core = None, {}, None, None

"""ONNX Runtime backends: `ort-cpu` and `ort-cuda`, with IO binding.

Buffers are allocated once per set of input shapes and bound to the session, so
the denoising loop allocates nothing here. The output arrays returned by run()
alias those buffers (see runtime.engine).

ort-cpu binds host arrays directly (zero copy). ort-cuda keeps inputs and outputs
in device memory (runtime/backends/ort_cuda.py): inputs are copied host -> device,
outputs device -> host once per run, and the UNet's run is captured as a CUDA graph
per set of shapes and replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime import cache
from runtime.args import first_line
from runtime.backends.ort_cuda import MAX_GRAPHS, DeviceBinding, DeviceBindings, provider_options
from runtime.bundle import GraphSpec
from runtime.cache import GROWS, LORA_DISABLED_OPTIMIZERS, LORA_MIN_BYTES
from runtime.engine import Engine, SpecMismatch

PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider"}




def session_options(optimized_out: Path | None = None, optimize: bool = True,
                    all_external: bool = False) -> ort.SessionOptions:
    """`all_external`: save every initializer of the optimized graph externally, down to
    LORA_MIN_BYTES (the sizes export/weight_map.py maps)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
        # weights go to one external file so graphs > 2 GB save too
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name",
            optimized_out.name + ".data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(LORA_MIN_BYTES) if all_external else "1024")
    return so


def weights_as_inputs(path: Path, names: set[str], source: Path | None = None) -> None:
    """Write to `path` the graph at `source` (default: `path` itself, rewritten) with the
    initializers `names` (a bundle's mapped weights) made graph inputs: a LoRA swap then
    writes new weights into the arrays bound to them, with no new session; their bytes
    are not written. Needs the `onnx` package (the `lora` extra). A weight only ever
    gathered from (an embedding table) takes any number of rows (GROWS)."""
    try:
        import onnx
    except ImportError:
        raise RuntimeError("run-time LoRAs need the onnx package: pip install 'sdrt[lora]'") from None
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    source = source or path
    model = onnx.load(str(source), load_external_data=False)
    g = model.graph
    moved = [t for t in g.initializer if t.name in names]
    # lookup tables (only ever a Gather's data): their rows axis is symbolic, so that
    # textual inversion can bind a larger token-embedding table [V + k, C]
    uses: dict[str, set[str]] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, set()).add("table" if node.op_type == "Gather" and k == 0 else "other")
    tables = {t.name for t in moved if uses.get(t.name) == {"table"}}
    if len(moved) != len(names):
        lost = sorted(names - {t.name for t in moved})
        raise RuntimeError(f"the graph has no initializer for {len(lost)} mapped weights (e.g. "
                           f"{lost[0]}; renamed or folded by ORT's optimizer): run-time LoRAs "
                           f"cannot reach them")
    keep = [t for t in g.initializer if t.name not in names]
    listed = {i.name for i in g.input}  # IR < 4 lists initializers as inputs already
    rows = {name: f"{GROWS}_{k}" for k, name in enumerate(sorted(tables))}  # one name each
    g.input.extend(onnx.helper.make_tensor_value_info(
        t.name, t.data_type, [rows[t.name] if t.name in rows and k == 0 else d for k, d in enumerate(t.dims)])
        for t in moved if t.name not in listed)
    for t in keep:  # the rest is written again, alone: the moved bytes leave the disk
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(source.parent))
    del g.initializer[:]
    g.initializer.extend(keep)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=LORA_MIN_BYTES)


class OrtEngine(Engine):
    """One ONNX Runtime session for one graph; `backend` is ort-cpu or ort-cuda.

    ort-cpu with a cache key: the first load runs ORT's optimizer once and saves the
    optimized graph in the engine cache; later loads read it with the optimizer off
    (full-size UNet session start: 11.4 s -> 0.8 s in our trial, DESIGN.md).
    ort-cuda uses the engines stage's fp16 fused graph when one is cached; with
    `cuda_graph` its runs are captured and replayed as CUDA graphs (one per set of
    shapes); a session that cannot have them (ORT refuses graphs with nodes off the
    GPU) runs without, and `cuda_graph_status` says why.
    `cache_status` says what happened: "hit", "built", or "off".
    """

    def __init__(self, spec: GraphSpec, path: Path, backend: str = "ort-cpu",
                 cache_key: cache.CacheKey | None = None,
                 cuda_graph: bool = False, max_graphs: int = MAX_GRAPHS,
                 source: Path | None = None, check_source: Callable[[], None] | None = None,
                 weights: dict[str, np.ndarray] | None = None):
        """`source` (ort-cpu): the graph to optimize and run instead of the bundle's
        `path`, e.g. engines.build's graph with onnxruntime's CPU fusions.
        `check_source`: called before the optimized graph is built from the bundle's
        graph (its hash check; raises when the file is damaged).
        `weights` (cache_key = cache.ort_cpu_lora_key or ort_cuda_lora_key): initializer name ->
        float32 array for every weight the bundle maps (LoRA: runtime/lora_apply.py), fed
        as inputs of the LoRA-ready graph; the engine keeps these arrays (the only copy:
        ORT has none) and set_weights() rewrites them in place."""
        super().__init__(spec, path)
        self.weights = weights
        self.lora = weights is not None
        self.check_source = check_source
        self.source = Path(source) if source is not None else self.path
        if backend not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime backend {backend!r}")
        self.backend = backend
        self.cache_key = cache_key
        self.cache_status = "off"
        self.cache_note = ""  # appended to cache_status: e.g. a damaged CPU-fused graph
        self.cuda_graph = cuda_graph and backend == "ort-cuda"
        self.cuda_graph_status = "on" if self.cuda_graph else "off"
        self.max_graphs = max_graphs  # shape sets captured; more run without a graph
        self.session: ort.InferenceSession | None = None
        self.binding: ort.IOBinding | None = None  # ort-cpu
        self.inputs: dict[str, np.ndarray] = {}  # ort-cpu: host arrays bound zero-copy
        self.outputs: dict[str, np.ndarray] = {}
        self.tables: set[str] = set()  # weight inputs of any row count (GROWS)
        # ort-cuda: the weights' device copies, bound to every shape's binding (the host
        # arrays stay: a swap writes them, then copies them over, same device address)
        self.device_weights: dict[str, ort.OrtValue] | None = None
        self.device: DeviceBindings | None = None  # ort-cuda
        self.current: DeviceBinding | None = None

    @property
    def on_device(self) -> bool:
        return self.backend == "ort-cuda"

    def _optimize_into(self, folder: Path) -> Path:
        """Run ORT's optimizer on the bundle graph and save the result into `folder`
        (ort-cuda's LoRA-ready graph: the bundle's as is, its weights made inputs)."""
        out = folder / self.path.name
        if self.check_source is not None and self.source == self.path:
            self.check_source()  # the artifact's key trusts the manifest's hashes
        if self.backend == "ort-cuda":
            assert self.weights is not None
            weights_as_inputs(out, set(self.weights), source=self.path)
            return out
        ort.InferenceSession(str(self.source), session_options(optimized_out=out,
                                                               all_external=self.lora),
                             providers=[PROVIDERS[self.backend]],
                             disabled_optimizers=LORA_DISABLED_OPTIMIZERS if self.lora else None)
        if self.weights is not None:
            weights_as_inputs(out, set(self.weights))
        return out

    def _cached_graph(self, rebuild: bool = False) -> Path | None:
        """The cached graph to load (None: use the bundle's); sets cache_status."""
        if self.cache_key is None:
            return None
        if self.cache_key.backend != "ort-cpu" and not self.lora:  # from engines.build
            try:
                found = cache.lookup(self.cache_key)
            except OSError as e:
                found, self.cache_status = None, f"off ({e.strerror or e})"
                return None
            self.cache_status = "hit" if found else "miss (fp32 bundle graph)"
            return found
        found, self.cache_status = cache.fetch(self.cache_key, self._optimize_into, rebuild)
        if found is None and self.lora:  # the bundle's graph keeps small weights inline
            raise RuntimeError(f"run-time LoRAs need the engine cache, which is "
                               f"{self.cache_status}")
        if found is not None and self.source != self.path:
            self.cache_status += " from the CPU-fused graph"
        self.cache_status += self.cache_note
        return found

    def _session(self, path: Path, optimized: bool) -> ort.InferenceSession:
        # ort-cpu's cached graph is already optimized for this CPU; ort-cuda's fp16
        # graph still gets ORT's own (fast) session-time optimizations.
        optimize = not (optimized and self.backend == "ort-cpu")
        options = session_options(optimize=optimize)
        if not self.on_device:
            return ort.InferenceSession(str(path), options, providers=[PROVIDERS[self.backend]])
        if self.cuda_graph:
            try:
                return ort.InferenceSession(str(path), options, providers=[
                    (PROVIDERS[self.backend], provider_options(cuda_graph=True))])
            except Exception as e:  # e.g. nodes left on the CPU: no graph possible
                self.cuda_graph = False
                self.cuda_graph_status = f"off ({first_line(e)[:160]})"
        return ort.InferenceSession(str(path), options, providers=[
            (PROVIDERS[self.backend], provider_options(cuda_graph=False))])

    def _load(self) -> None:
        provider = PROVIDERS[self.backend]
        try:
            try:
                cached = self._cached_graph()  # building it fails on a damaged source too
                try:
                    self.session = self._session(cached or self.source, cached is not None)
                except Exception:
                    if cached is None or self.backend != "ort-cpu":
                        raise
                    # a damaged cache entry of the right size: rebuild it once from the source
                    cached = self._cached_graph(rebuild=True)
                    self.session = self._session(cached or self.source, cached is not None)
            except Exception as e:
                if self.source == self.path:
                    raise
                # the CPU-fused graph (engines.build) is unusable: the bundle's, uncached
                self.cache_status = (f"off (the CPU-fused graph failed: {first_line(e)[:120]}; "
                                     f"rebuild it with engines.build --backend ort-cpu --force)")
                self.source, self.cache_key = self.path, None
                self.session = self._session(self.path, False)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            # on the CPU nothing but the graph can fail a session; on CUDA the device can
            raise self.error(f"cannot load {self.path}: {first_line(e)}",
                             unreadable=not self.on_device) from None
        if provider not in self.session.get_providers():  # ORT falls back silently
            raise self.error(f"{provider} is not active (got {self.session.get_providers()})")
        inputs = {t.name for t in self.session.get_inputs()}
        if self.weights is not None:  # the LoRA-ready graph: the weights are inputs too
            if not set(self.weights) <= inputs:
                raise self.error(f"the LoRA-ready graph does not take {len(set(self.weights) - inputs)} "
                                 f"weights as inputs; remove its cache entry", kind=SpecMismatch)
            inputs -= set(self.weights)
            self.tables = {i.name for i in self.session.get_inputs()
                           if i.name in self.weights and i.shape
                           and str(i.shape[0]).startswith(GROWS)}
        self.check_io(inputs, [t.name for t in self.session.get_outputs()])
        if self.on_device:
            if self.weights is not None:  # the LoRA-ready graph's weights, on the GPU
                try:
                    self.device_weights = {n: ort.OrtValue.ortvalue_from_numpy(w, "cuda", 0)
                                           for n, w in self.weights.items()}
                except Exception as e:  # out of device memory, most likely
                    raise self.error(f"cannot put its weights on the GPU: {first_line(e)}") from None
            self.device = DeviceBindings(self.session, self.spec, self.cuda_graph,
                                         max_graphs=self.max_graphs, weights=self.device_weights)
            if self.device_weights is not None:  # one dict: replace_weight() changes both
                self.device_weights = self.device.weights

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        assert self.session is not None
        if self.device is not None:
            self.current = None  # the old plain binding can be freed before the new one
            try:
                self.current = self.device.get(shapes)
            except Exception as e:  # out of device memory, most likely
                raise self.error(f"cannot allocate: {first_line(e)}", shapes) from None
            return
        binding = self.session.io_binding()
        self.inputs, self.outputs = {}, {}
        for name, w in (self.weights or {}).items():  # bound once per shapes, kept across runs
            binding.bind_input(name, "cpu", 0, w.dtype, w.shape, w.ctypes.data)
        for t in self.spec.inputs:
            shape, dtype = shapes[t.name], np.dtype(t.dtype)
            buf = np.zeros(shape, dtype)
            binding.bind_input(t.name, "cpu", 0, dtype, shape, buf.ctypes.data)
            self.inputs[t.name] = buf
        for name, shape in self.spec.output_shapes(shapes).items():
            dtype = np.dtype(next(t.dtype for t in self.spec.outputs if t.name == name))
            out = np.zeros(shape, dtype)
            binding.bind_output(name, "cpu", 0, dtype, shape, out.ctypes.data)
            self.outputs[name] = out
        self.binding = binding

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """New values for some of the LoRA-ready graph's weight inputs, written into the
        bound arrays in place: the next run uses them, no session is rebuilt. A lookup
        table (`tables`) may get another number of rows."""
        if self.weights is None:
            raise self.error("set_weights() on an engine without weight inputs")
        unknown = sorted(set(weights) - set(self.weights))
        if unknown:
            raise self.error(f"unknown weights {unknown[:3]}")
        for name, value in weights.items():
            w = self.weights[name]
            if value.shape != w.shape and name in self.tables and value.shape[1:] == w.shape[1:]:
                # a lookup table with other rows (textual inversion): bound in its place
                # by the next allocate(); the engine keeps this array
                table = np.ascontiguousarray(value, np.float32)
                if self.device is not None:  # ort-cuda: a new device buffer, new bindings
                    try:
                        self.device.replace_weight(name, table)
                    except ValueError as e:
                        raise self.error(str(e)) from None
                    except Exception as e:  # out of device memory, most likely
                        raise self.error(f"cannot put weight {name} on the GPU: {first_line(e)}") from None
                self.weights[name] = table
                self.shapes, self.current = None, None
                continue
            elif value.shape != w.shape:
                raise self.error(f"weight {name} is {list(value.shape)}, the graph takes {list(w.shape)}")
            elif value is not w:  # lora_weights(into=) wrote it there already
                np.copyto(w, value)
            if self.device_weights is not None:  # same address: bindings keep pointing there
                try:
                    self.device_weights[name].update_inplace(self.weights[name])
                except Exception as e:
                    raise self.error(f"cannot copy weight {name} to the GPU: {first_line(e)}") from None

    def _copy_in(self, name: str, array: np.ndarray) -> None:
        if self.current is not None:
            self.current.copy_in(name, array)
        else:
            np.copyto(self.inputs[name], array)

    def _run(self) -> dict[str, np.ndarray]:
        try:
            if self.current is not None:
                return self.current.run(self.session)
            self.session.run_with_iobinding(self.binding)
        except Exception as e:
            raise self.error(f"run failed: {first_line(e)}") from None
        return self.outputs

    def _release(self) -> None:
        self.binding, self.session, self.weights = None, None, None
        self.device, self.current, self.device_weights = None, None, None
        self.inputs, self.outputs = {}, {}

"""A TensorRT engine whose plans come from the engine cache (runtime/cache.py), several
per graph (static and dynamic profiles), swapped as the input shapes change.

    unet = CachedTensorRTEngine(manifest.graphs["unet"], manifest.profile, device)
    unet.load()                                   # the plan for the profile's opt shapes
    unet.allocate({"sample": (2, 4, 64, 64), ...})  # may swap to a static 512x512 plan
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from runtime import cache
from runtime.backends.tensorrt import TensorRTDevice, TensorRTEngine
from runtime.bundle import GraphEntry, Profile
from runtime.cuda import CudaError
from runtime.engine import Shapes
from runtime.tensorrt_env import trt_version


class CachedTensorRTEngine(TensorRTEngine):
    """A bundle graph's TensorRT engine whose plan comes from the engine cache.

    load() deserializes the plan for the profile's opt shapes; allocate(shapes) swaps
    to another cached plan when these shapes have a better one (a static plan for
    exactly them) or the loaded plan's profile does not cover them. Plans are found
    with find_plan (this TensorRT version and GPU only); none found is an EngineError
    that says which `engines.build` command makes one.

    A swapped-out plan stays deserialized (its engine and context, not its buffers), up
    to `keep_plans` plans per graph, so switching back (guidance on/off between a static
    and a dynamic UNet plan) does not read and deserialize it again. Each kept plan holds
    its weights in device memory: `keep_plans=1` on small Jetson modules."""

    def __init__(self, entry: GraphEntry, profile: Profile,
                 device: TensorRTDevice | None = None, cache_dir: Path | None = None,
                 cuda_graph: bool = False, keep_plans: int = 2):
        super().__init__(entry.spec, Path(), device, cuda_graph)
        self.entry = entry
        self.profile = profile
        self.cache_dir = cache_dir
        self.found: dict[tuple, Path] = {}  # input shapes -> plan
        self.keep_plans = max(1, keep_plans)
        self.parked: dict[Path, tuple[Any, Any, int]] = {}  # plan -> engine, context, scratch
        # refit_weights(): every weight written since load, its value now, and how to refit a
        # plan deserialized later (another profile) with them
        self.refitted: dict[str, np.ndarray] = {}
        self.refit_with: tuple[Callable[[str], np.ndarray | None] | None, Path | None] = (None, None)
        self.refit_only = False  # run-time LoRAs: refittable plans only, from then on
        self.table_rows = 0  # embeddings: plans keeping this many token-table rows only
        self.options: dict[Path, str] = {}  # each plan's build options, read when it was found

    def _find(self, shapes: Shapes | None) -> Path | None:
        """find_plan for this graph on this device (created here on first use)."""
        try:
            if self.device is None:
                self.device = TensorRTDevice()
            version = trt_version()
        except (CudaError, ImportError) as e:
            raise self.error(str(e), shapes) from None
        return cache.find_plan(self.entry, shapes, version, self.device.info, self.cache_dir,
                               refittable=self.refit_only, rows=self.table_rows)

    def _lookup(self, shapes: Shapes) -> Path | None:
        """The plan for these shapes, found (and hash-checked) once per process; found
        again if its file has gone since (another process's cache cap or prune removed
        it) and it is not in memory (loaded or parked) any more."""
        memo = tuple(sorted((k, tuple(v)) for k, v in shapes.items()))
        known = self.found.get(memo)
        in_memory = known is not None and (
            known in self.parked or (known == self.path and self.engine is not None))
        if known is not None and not in_memory and not known.is_file():
            del self.found[memo]
        if memo not in self.found:
            path = self._find(shapes)
            if path is None:
                return None
            self.found[memo] = path
        return self.found[memo]

    def _no_plan(self, shapes: Shapes) -> Exception:
        assert self.device is not None  # _find made it
        return self.error(
            f"no TensorRT {trt_version()} plan for {self.device.info.model} covers these "
            f"shapes; build one with `python -m engines.build BUNDLE --backend tensorrt"
            f"{' --refit' if self.refit_only else ''}` "
            f"(--max-size/--max-batch for a wider profile, --static for one shape)", shapes)

    def refuses(self, shapes: Shapes) -> str | None:
        shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        if self._lookup(shapes) is not None:
            return None
        return f"no {self.name} plan in the engine cache covers these shapes"

    def _plan_for(self, shapes: Shapes) -> Path:
        path = self._lookup(shapes)
        if path is None:
            raise self._no_plan(shapes)
        return path

    def _load(self) -> None:
        """Load the plan for the profile's opt shapes, or else any plan of this graph for
        this TensorRT and GPU (e.g. only --static plans for other shapes): allocate() swaps
        to the right one, and the shared scratch grows then if it needs more."""
        opt = {name: tuple(row["opt"]) for name, row in self.profile.shapes(self.spec).items()}
        path = self._lookup(opt) or self._find(None)
        if path is None:
            raise self._no_plan(opt)
        self.path = path
        self._options(path)  # while its entry is surely there
        self.cache_status = "hit"  # plans come from engines.build; none is an error above
        super()._load()

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        path = self._plan_for(shapes)
        if path != self.path or self.engine is None:
            self._swap(path)
        super()._allocate(shapes)

    def _swap(self, path: Path) -> None:
        """Make `path` the loaded plan: park the current one (its graph and buffers
        freed), take `path` from the parked ones or deserialize it."""
        current = (self.engine, self.context, self.scratch_bytes)
        old = self.path
        wanted = self.parked.pop(path, None)
        self._unload()  # graph, buffers; engine/context references dropped here ...
        if current[0] is not None and self.keep_plans > 1:
            self.parked[old] = current  # ... but kept alive here
            while len(self.parked) > self.keep_plans - 1:
                self.parked.pop(next(iter(self.parked)))  # the oldest
        self.path = path
        self._options(path)
        if wanted is not None:
            self.engine, self.context, self.scratch_bytes = wanted
            assert self.device is not None
            self.device.reserve(self.scratch_bytes)
        else:
            super()._load()
            if self.refitted:  # a plan from the file has the bundle's weights
                more, bundle_graph = self.refit_with
                try:
                    self.refit(self.refitted, more, self._graph_for(bundle_graph))
                except BaseException:
                    self._unload()  # never left loaded without the LoRAs' weights
                    raise

    def _options(self, path: Path) -> str:
        """The build options of plan `path` (its cache key's), read once: a plan pruned
        from the cache while loaded keeps what it was built with."""
        if path not in self.options:
            self.options[path] = cache.artifact_options(path) or ""
        return self.options[path]

    def keeps_rows(self, rows: int = cache.TABLE_ROWS) -> bool:
        """Whether the current plan keeps `rows` token-table rows (its cache key says)."""
        return self.path != Path() and f"rows{rows}" in self._options(self.path).split("-")

    def _graph_for(self, bundle_graph: Path | None) -> Callable[[], Path] | None:
        """The graph the current plan was built from, looked up only if the parser
        refitter is needed (TensorRT 10, weights the map lacks)."""
        return None if bundle_graph is None else lambda: self.refit_graph(bundle_graph)

    def refit_weights(self, weights: dict[str, np.ndarray],
                      more: Callable[[str], np.ndarray | None] | None = None,
                      bundle_graph: Path | None = None, changed: set[str] | None = None,
                      rows: int = 0) -> None:
        """As TensorRTEngine.refit, on a refittable plan (swapped to one if the loaded
        plan is not: refit_only from then on). `rows`: on a plan keeping that many
        token-table rows (embeddings), likewise from then on. `bundle_graph`: the
        bundle's ONNX graph; the parser refitter reads the graph the plan was built from
        (refit_graph). Plans swapped in later get the weights in `changed` (those that
        now differ from the file's; default all); parked plans hold old ones: they go."""
        rows = rows or self.table_rows
        if (self.refit_only, self.table_rows) != (True, rows):
            self.found = {}  # plans found under looser requirements
        if self.engine is not None and (not getattr(self.engine, "refittable", False)
                                        or (rows and not self.keeps_rows(rows))):
            shapes = self.shapes or {n: tuple(r["opt"]) for n, r in self.profile.shapes(self.spec).items()}
            before = (self.refit_only, self.table_rows)
            self.refit_only, self.table_rows, self.found = True, rows, {}
            path = self._lookup(shapes)
            if path is None:  # the plans it had stay, as before this call
                (self.refit_only, self.table_rows), self.found = before, {}
                what = ("keeps no token-table rows for embeddings and no plan that does"
                        if rows else "is not refittable and no refittable plan")
                raise self.error(f"plan {self.path.name} {what} covers its shapes: build them "
                                 f"with `python -m engines.build BUNDLE --backend tensorrt --refit`")
            if path != self.path:
                self._swap(path)
        self.refit_only, self.table_rows = True, rows
        self.parked = {}
        self.refit(weights, more, self._graph_for(bundle_graph), keep=self.refitted)
        for name, array in weights.items():
            if changed is None or name in changed:
                self.refitted[name] = array
            else:
                self.refitted.pop(name, None)
        # a table's refit (no `more`) keeps what the LoRAs' refit knew
        self.refit_with = (more or self.refit_with[0], bundle_graph or self.refit_with[1])

    def refit_graph(self, bundle_graph: Path) -> Path:
        """The ONNX graph the loaded plan was built from, for OnnxParserRefitter: the one
        kept in its cache entry for a text encoder with token-table rows (the bundle's
        has fewer), else the bundle's."""
        if not any(o.startswith("rows") for o in self._options(self.path).split("-")):
            return bundle_graph
        kept = self.path.parent / bundle_graph.name
        if not kept.is_file():
            raise self.error(f"plan {self.path} lost the graph it was built from; rebuild it "
                             f"with `python -m engines.build BUNDLE --backend tensorrt --refit --force`")
        return kept

    def reset_weights(self) -> None:
        self.refitted, self.parked = {}, {}
        super().reset_weights()

    def _release(self) -> None:
        self.parked = {}  # contexts before engines: each tuple drops both, context last held
        super()._release()


"""The one Engine interface every backend implements (ort-cpu, ort-cuda, openvino, tensorrt).

Lifecycle, in this order (as TensorRT's demo Engine): load() -> allocate(shapes)
-> set_constant(...) / run(feeds) many times -> release().

- allocate(shapes) sizes every I/O buffer for one set of input shapes. Calling it
  again with the same shapes does nothing; new shapes reallocate (and, on
  TensorRT, drop any CUDA graph captured for the old shapes) and forget which
  inputs were given.
- set_constant(name, array) copies an input that stays the same across many runs
  (the UNet's encoder_hidden_states) into its buffer once.
- run(feeds) copies the other inputs in, runs, and returns the outputs as host
  arrays. The returned arrays ALIAS buffers reused by the next run: copy them if
  you keep them past the next call.

This base class does every check once, for all backends: shapes and names at
allocate(), dtypes, shapes and names of every feed, and that every input was given
(by run or set_constant) since the last allocate(), so no backend ever runs on
zeros or stale device memory. A backend implements `_load`, `_allocate`, `_copy_in`,
`_run` and `_release`, and calls `check_io` with the names its graph or plan has.

Errors raise EngineError naming the engine and the shapes involved; a graph whose
inputs/outputs differ from the manifest raises SpecMismatch (a corrupt bundle, which
`auto` reports instead of falling back from).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from runtime.bundle import GraphSpec

Shapes = Mapping[str, tuple[int, ...]]


class EngineError(RuntimeError):
    """A backend failed to load, allocate or run a graph: `graph` names it, `source` is
    the file the engine reads (the bundle's graph, or a cached artifact), `unreadable`
    says the failure was reading or parsing that file (not the device or the backend)."""

    graph: str | None = None
    source: Path | None = None
    unreadable: bool = False


class SpecMismatch(EngineError):
    """A graph's inputs/outputs differ from its spec in the manifest: a corrupt bundle."""


class Engine(ABC):
    backend: str = "?"
    cache_status: str | None = None  # backends with an engine cache: "hit", "built", ...

    def __init__(self, spec: GraphSpec, path: Path):
        self.spec = spec
        self.path = Path(path)
        self.shapes: dict[str, tuple[int, ...]] | None = None  # shapes allocated for
        self.loaded = False
        self.given: set[str] = set()  # inputs copied in since the last allocate()
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        self._axes = {t.name: t.shape for t in spec.inputs}  # ints fixed, str named axes

    @property
    def name(self) -> str:
        return self.spec.name

    def error(self, what: str, shapes: Shapes | None = None,
              kind: type[EngineError] = EngineError, unreadable: bool = False) -> EngineError:
        shapes = self.shapes if shapes is None else shapes
        where = f" at shapes {dict(shapes)}" if shapes else ""
        e = kind(f"{self.backend} engine {self.name!r}: {what}{where}")
        e.graph, e.source, e.unreadable = self.name, self.path, unreadable
        return e

    def check_io(self, inputs: Iterable[str], outputs: Iterable[str], what: str = "graph") -> None:
        """SpecMismatch unless the loaded graph's (or plan's) I/O names are the spec's."""
        for kind, got, specs in (("inputs", set(inputs), self.spec.inputs),
                                 ("outputs", set(outputs), self.spec.outputs)):
            want = {t.name for t in specs}
            if got != want:
                raise self.error(f"{what} {kind} {sorted(got)} do not match the manifest's "
                                 f"{sorted(want)}", kind=SpecMismatch)

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Feeds must be known inputs matching the allocated shapes and dtypes exactly."""
        if self.shapes is None:
            raise self.error("run() before allocate()")
        for name, a in feeds.items():
            want = self.shapes.get(name)
            if want is None:
                raise self.error(f"unknown input {name!r}; the graph takes {sorted(self._dtypes)}")
            if a.shape != want or a.dtype != self._dtypes[name]:
                raise self.error(f"input {name} is {a.dtype}{list(a.shape)}, allocated "
                                 f"{self._dtypes[name]}{list(want)}")

    def refuses(self, shapes: Shapes) -> str | None:
        """Why these input shapes cannot run here (a few words), or None. Only engines
        built for a shape profile (TensorRT plans) have limits; ONNX Runtime and OpenVINO
        run any shape (OpenVINO compiles each new one)."""
        return None

    # --- the lifecycle every backend shares --------------------------------------------

    def load(self) -> None:
        self._load()
        self.loaded = True

    def allocate(self, shapes: Shapes) -> None:
        shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        if shapes == self.shapes:
            return
        if not self.loaded:
            raise self.error("allocate() before load()", shapes)
        if set(shapes) != set(self._dtypes):
            raise self.error(f"allocate() needs the shapes of exactly {sorted(self._dtypes)}",
                             shapes)
        for name, shape in shapes.items():
            axes = self._axes[name]
            if len(shape) != len(axes) or any(
                    d < 1 or (isinstance(a, int) and d != a) for a, d in zip(axes, shape, strict=True)):
                raise self.error(f"input {name} has shape {list(shape)}, the graph takes "
                                 f"{list(axes)}", shapes)
        self.shapes, self.given = None, set()
        self._allocate(shapes)
        self.shapes = shapes

    def set_constant(self, name: str, array: np.ndarray) -> None:
        self._check_feeds({name: array})
        self._copy_in(name, array)
        self.given.add(name)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feeds(feeds)
        for name, array in feeds.items():
            self._copy_in(name, array)
            self.given.add(name)
        if len(self.given) != len(self._dtypes):
            never = sorted(set(self._dtypes) - self.given)
            raise self.error(f"inputs {never} were never given (run or set_constant)")
        return self._run()

    def release(self) -> None:
        try:
            self._release()
        finally:
            self.shapes, self.given, self.loaded = None, set(), False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- what a backend implements -----------------------------------------------------

    @abstractmethod
    def _load(self) -> None:
        """Read the graph or plan; call check_io with its I/O names."""

    @abstractmethod
    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Buffers for these (checked) input shapes; self.shapes is None meanwhile."""

    @abstractmethod
    def _copy_in(self, name: str, array: np.ndarray) -> None:
        """Copy one (checked) input into its buffer."""

    @abstractmethod
    def _run(self) -> dict[str, np.ndarray]:
        """Run on the buffers; return the output arrays (reused by the next run)."""

    @abstractmethod
    def _release(self) -> None:
        """Free everything the backend holds."""

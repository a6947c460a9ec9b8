"""The one Engine interface every backend implements (ort-cpu, ort-cuda, tensorrt).

Lifecycle, in this order (as TensorRT's demo Engine): load() -> allocate(shapes)
-> set_constant(...) / run(feeds) many times -> release().

- allocate(shapes) sizes every I/O buffer for one set of input shapes. Calling it
  again with the same shapes does nothing; new shapes reallocate (and, on
  TensorRT, drop any CUDA graph captured for the old shapes).
- set_constant(name, array) copies an input that stays the same across many runs
  (the UNet's encoder_hidden_states) into its buffer once.
- run(feeds) copies the other inputs in, runs, and returns the outputs as host
  arrays. The returned arrays ALIAS buffers reused by the next run: copy them if
  you keep them past the next call.

Errors raise EngineError naming the engine and the shapes involved.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from runtime.bundle import GraphSpec

Shapes = Mapping[str, tuple[int, ...]]


class EngineError(RuntimeError):
    """A backend failed to load, allocate or run a graph."""


class SpecMismatch(EngineError):
    """A graph's inputs/outputs differ from its spec in the manifest: a corrupt bundle."""


class Engine(ABC):
    backend: str = "?"

    def __init__(self, spec: GraphSpec, path: Path):
        self.spec = spec
        self.path = Path(path)
        self.shapes: dict[str, tuple[int, ...]] | None = None  # shapes allocated for

    @property
    def name(self) -> str:
        return self.spec.name

    def error(self, what: str, shapes: Shapes | None = None,
              kind: type[EngineError] = EngineError) -> EngineError:
        shapes = self.shapes if shapes is None else shapes
        where = f" at shapes {dict(shapes)}" if shapes else ""
        return kind(f"{self.backend} engine {self.name!r}: {what}{where}")

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Feeds must match the allocated shapes and the spec's dtypes exactly."""
        if self.shapes is None:
            raise self.error("run() before allocate()")
        for t in self.spec.inputs:
            a = feeds.get(t.name)
            if a is None:
                continue
            if a.shape != self.shapes[t.name] or a.dtype != np.dtype(t.dtype):
                raise self.error(f"input {t.name} is {a.dtype}{list(a.shape)}, allocated "
                                 f"{t.dtype}{list(self.shapes[t.name])}")

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def allocate(self, shapes: Shapes) -> None: ...

    @abstractmethod
    def set_constant(self, name: str, array: np.ndarray) -> None: ...

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

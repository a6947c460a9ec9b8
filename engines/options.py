"""What one `engines.build` run was asked to do, as frozen data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.bundle import Profile


@dataclass(frozen=True)
class TensorRTOptions:
    workspace_gb: float | None = None  # memory pool limit for tactics; None: TensorRT's default
    opt_level: int | None = None  # builder_optimization_level 0-5 (TensorRT's default is 3)
    timing_cache: Path | None = None  # reused across builds; None: one per GPU in the cache dir
    refit: bool = False  # build refittable plans (weights can be swapped without a rebuild)

    def key(self, rows: int = 0) -> str:
        """The options that change a plan, for its cache key (runtime.cache.ANY when none
        is set, so default plans keep their cache folders): a build asked with other
        options builds another plan instead of reporting the first one cached. The
        timing cache path is not among them. `rows`: token-table rows kept for
        embeddings (the text encoder's refittable plan)."""
        from runtime.cache import ANY

        parts = [f"opt{self.opt_level}" if self.opt_level is not None else "",
                 f"ws{self.workspace_gb:g}g" if self.workspace_gb is not None else "",
                 "refit" if self.refit else "", f"rows{rows}" if rows else ""]
        return "-".join(p for p in parts if p) or ANY


@dataclass(frozen=True)
class BuildOptions:
    bundle: Path
    backend: str  # "tensorrt" | "ort-cuda"
    graphs: tuple[str, ...]  # which bundle graphs, in build order
    profile: Profile  # batch/height/width min/opt/max in images and pixels
    static: Profile | None = None  # TensorRT --static: min = opt = max (one shape)
    cache_dir: Path | None = None  # None: runtime.cache.default_dir()
    no_build: bool = False  # only report what is cached; exit 2 if something is missing
    force: bool = False  # rebuild even when an intact artifact is cached
    tensorrt: TensorRTOptions = TensorRTOptions()

"""LoRAs on a bundle's own weights: the initializers to run instead of the graph's.

The manifest's name map (export/weight_map.py) says, for each text-encoder and UNet
weight, which initializer holds it, whether the exporter stored it transposed (a
MatMul's [in, out]) and where its bytes are. Every set of LoRAs is applied to the base
weights read from the bundle, never to weights a previous set changed, so swapping
A -> B -> A gives A's weights bit for bit and `[]` gives the bundle's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.bundle import BundleError, Manifest, inside
from runtime.embeddings import TOKEN_TABLE
from runtime.lora import LoraFile, delta, read_lora

LORA_GRAPHS = {"text_encoder": "text_encoder", "unet": "unet"}  # component -> graph


def missing_support() -> str | None:
    """Why run-time LoRAs cannot run in this install (one line), or None."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        return "run-time LoRAs need the onnx package: pip install 'sdrt[lora]'"
    return None


def bundle_params(manifest: Manifest) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> {parameter name: its torch shape}: what read_lora matches names against."""
    out = {}
    for component, graph in LORA_GRAPHS.items():
        weights = manifest.graphs[graph].weights
        if not weights:
            raise BundleError("this bundle has no weight name map (exported before LoRA "
                              "support); re-export it with `python -m export` for LoRAs")
        # the token table is not a LoRA target: textual inversion grows it (a LoRA key for
        # it then matches no parameter: one line)
        out[component] = {name: w.shape[::-1] if w.transposed else w.shape
                          for name, w in weights.items() if name != TOKEN_TABLE}
    return out


def read_loras(manifest: Manifest, loras: Sequence[tuple[str | Path, float]]
               ) -> list[tuple[LoraFile, float]]:
    """Each (file, scale) read and matched against the bundle's parameters (LoraError)."""
    params = bundle_params(manifest)
    return [(read_lora(path, params), float(scale)) for path, scale in loras]


def lora_weights(bundle: Path, manifest: Manifest, loras: Sequence[tuple[LoraFile, float]],
                 also: dict[str, set[str]] | None = None,
                 into: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """graph -> {initializer: float32 weight in the initializer's layout} for every weight
    the LoRAs change (base + each LoRA's delta at its scale, in order), and for the
    parameters in `also` (component -> names: the bundle's own where no LoRA touches them).
    `into` (initializer -> array): computed in those arrays (a loaded engine's weight
    inputs), with no copy of the weights made."""
    out: dict[str, dict[str, np.ndarray]] = {}
    scratch = np.empty(0, np.float32)  # every delta in turn: [largest weight's size]
    for component, graph in LORA_GRAPHS.items():
        weights = manifest.graphs[graph].weights or {}
        touched = {name for lora, _ in loras for c, name in lora.layers if c == component}
        for name in sorted(touched | (also or {}).get(component, set())):
            w = weights[name]
            value = (into or {}).get(w.initializer)
            if value is None:  # the initializer's layout: [in, out] if transposed
                value = np.empty(w.shape, "<f4")
            read_base(bundle, w.file, w.offset, name, value)
            if value.size > scratch.size:
                scratch = np.empty(value.size, np.float32)
            for lora, scale in loras:
                layer = lora.layers.get((component, name))
                if layer is not None:
                    value += delta(layer, scale, w.transposed, scratch)
            out.setdefault(graph, {})[w.initializer] = value
    return out


def read_base(bundle: Path, file: str, offset: int, name: str, out: np.ndarray) -> None:
    """The bundle's bytes of one weight straight into `out` (float32, C order)."""
    with open(inside(bundle, file), "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise BundleError(f"{file} ends before {name}'s weight; re-export the bundle")


def touched(loras: Sequence[tuple[LoraFile, float]]) -> dict[str, set[str]]:
    """component -> the parameters these LoRAs change."""
    out: dict[str, set[str]] = {c: set() for c in LORA_GRAPHS}
    for lora, _ in loras:
        for component, name in lora.layers:
            out[component].add(name)
    return out


def all_params(manifest: Manifest) -> dict[str, set[str]]:
    """component -> every parameter the bundle maps (a LoRA-ready graph takes them all)."""
    return {c: set(manifest.graphs[g].weights or {}) for c, g in LORA_GRAPHS.items()}

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
from runtime.lora import LoraFile, delta, read_lora

LORA_GRAPHS = {"text_encoder": "text_encoder", "unet": "unet"}  # component -> graph


def bundle_params(manifest: Manifest) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> {parameter name: its torch shape}: what read_lora matches names against."""
    out = {}
    for component, graph in LORA_GRAPHS.items():
        weights = manifest.graphs[graph].weights
        if not weights:
            raise BundleError("this bundle has no weight name map (exported before LoRA "
                              "support); re-export it with `python -m export` for LoRAs")
        out[component] = {name: w.shape[::-1] if w.transposed else w.shape
                          for name, w in weights.items()}
    return out


def read_loras(manifest: Manifest, loras: Sequence[tuple[str | Path, float]]
               ) -> list[tuple[LoraFile, float]]:
    """Each (file, scale) read and matched against the bundle's parameters (LoraError)."""
    params = bundle_params(manifest)
    return [(read_lora(path, params), float(scale)) for path, scale in loras]


def lora_weights(bundle: Path, manifest: Manifest, loras: Sequence[tuple[LoraFile, float]]
                 ) -> dict[str, dict[str, np.ndarray]]:
    """graph -> {initializer: float32 weight in the initializer's layout} for every weight
    the LoRAs change: base + each LoRA's delta at its scale, in order."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for component, graph in LORA_GRAPHS.items():
        weights = manifest.graphs[graph].weights or {}
        touched = {name for lora, _ in loras for c, name in lora.layers if c == component}
        for name in sorted(touched):
            w = weights[name]
            count = int(np.prod(w.shape))
            base = np.fromfile(inside(bundle, w.file), "<f4", count, offset=w.offset)
            if base.size != count:
                raise BundleError(f"{w.file} ends before {name}'s weight; re-export the bundle")
            value = base.reshape(w.shape)  # the initializer's layout: [in, out] if transposed
            for lora, scale in loras:
                layer = lora.layers.get((component, name))
                if layer is not None:
                    value += delta(layer, scale, w.transposed)
            out.setdefault(graph, {})[w.initializer] = value
    return out

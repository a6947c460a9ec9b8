"""`python -m export --lora FILE[:SCALE]`: bake LoRAs into the weights before export.

The deltas come from runtime/lora.py, the same code the runtime's swaps use, so a merged
bundle and a run-time LoRA give the same weights; diffusers' load_lora_weights +
fuse_lora(lora_scale=) is the reference (tests/test_lora_export.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from export.components import Components
from export.errors import ExportError
from runtime.integrity import file_hashes
from runtime.lora import LoraError, delta, read_lora

LORA_COMPONENTS = ("text_encoder", "unet")


def lora_params(c: Components) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> {parameter name: shape}: what read_lora matches a file's names against."""
    return {name: {n: tuple(p.shape) for n, p in getattr(c, name).named_parameters()}
            for name in LORA_COMPONENTS}


def merge_loras(c: Components, loras: list[tuple[Path, float]]) -> list[dict]:
    """Add each LoRA's deltas to the components' weights, in order; returns what the
    manifest records of them (file name, sha256, scale, layers)."""
    params = lora_params(c)
    records = []
    for path, scale in loras:
        try:
            lora = read_lora(path, params)
        except LoraError as e:
            raise ExportError(str(e)) from None
        modules = {name: dict(getattr(c, name).named_parameters()) for name in LORA_COMPONENTS}
        with torch.no_grad():
            for (component, name), layer in lora.layers.items():
                modules[component][name] += torch.from_numpy(delta(layer, scale))
        records.append({"file": path.name, "sha256": file_hashes(path)[0], "scale": scale,
                        "layers": len(lora.layers)})
    return records

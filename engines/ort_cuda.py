"""ONNX -> fp16, fused ONNX Runtime graph for the `ort-cuda` backend.

As onnxruntime's own Stable Diffusion tool (onnxruntime/transformers/models/
stable_diffusion/optimize_pipeline.py): `optimize_model(model_type=unet|clip|vae,
opt_level=0, use_gpu=True)` fuses attention, group norm, bias-add, etc. in Python
(no CUDA needed at build time), then `convert_float_to_float16`. Unlike that tool we
keep graph inputs and outputs float32 (`keep_io_types=True`), so every backend
takes the same host arrays (runtime.engine); the cost is one Cast per I/O tensor.

The result is device independent, so it builds on any machine with onnxruntime,
GPU or not; its cache key carries the onnxruntime major.minor (runtime.cache.ort_cuda_key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

# onnxruntime's names for our graphs (safety_checker is a CLIP vision tower, which the
# SD tool optimizes as "unet": same attention/layernorm fusions, no text-only ones)
MODEL_TYPES = {
    "text_encoder": "clip",
    "unet": "unet",
    "vae_decoder": "vae",
    "safety_checker": "unet",
}


def _optimize(onnx_path: Path, model_type: str, attention: bool) -> Any:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.enable_attention = attention
    return optimize_model(str(onnx_path), model_type=model_type, num_heads=0, hidden_size=0,
                          opt_level=0, optimization_options=options, use_gpu=True)


def optimize_fp16(onnx_path: Path, out_dir: Path, graph: str, external: bool,
                  warn: Callable[[str], None] = print) -> Path:
    """Write `out_dir/<graph>.onnx` (+ `<graph>.onnx.data` when `external`, as for a
    source graph that had external data) and return its path."""
    model_type = MODEL_TYPES[graph]
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its INFO lines are not ours
    try:
        failed = None
        try:
            model = _optimize(onnx_path, model_type, attention=True)
        except TypeError as e:
            # onnxruntime's UNet attention fusion does int() of a 1-element array
            # (fusion_attention_unet.py get_num_heads), an error since numpy 2.4
            failed = str(e)
        if failed is not None:  # outside the except: the first try's graph is freed
            warn(f"{graph}: onnxruntime's attention fusion failed ({failed}); built without "
                 f"it (slower attention); with numpy<2.4 (or an onnxruntime that fixed it) "
                 f"rebuild with --force to get it")
            model = _optimize(onnx_path, model_type, attention=False)
        model.convert_float_to_float16(keep_io_types=True)
    finally:
        quiet.setLevel(level)
    out = out_dir / f"{graph}.onnx"
    model.save_model_to_file(str(out), use_external_data_format=external)
    return out

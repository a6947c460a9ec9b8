"""ONNX -> fused ONNX Runtime graphs: fp16 for `ort-cuda`, fp32 for `ort-cpu`.

As onnxruntime's own Stable Diffusion tool (onnxruntime/transformers/models/
stable_diffusion/optimize_pipeline.py): `optimize_model(model_type=unet|clip|vae,
opt_level=0, use_gpu=True)` fuses attention, group norm, bias-add, etc. in Python
(no CUDA needed at build time), then `convert_float_to_float16`. Unlike that tool we
keep graph inputs and outputs float32 (`keep_io_types=True`), so every backend
takes the same host arrays (runtime.engine); the cost is one Cast per I/O tensor.

The result is device independent, so it builds on any machine with onnxruntime,
GPU or not; its cache key carries the onnxruntime major.minor (runtime.cache.ort_cuda_key).

For `ort-cpu` (`optimize_fp32_cpu`) the same fusions run without the CUDA-only ones
(NhwcConv, GroupNorm, BiasSplitGelu, BiasAdd, packed QKV/KV, which have no CPU kernels)
and without fp16: attention becomes MultiHeadAttention, whose CPU kernel does not keep
the 4096 x 4096 score matrices of the 512x512 UNet the unfused graph materialises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# onnxruntime's names for our graphs (safety_checker is a CLIP vision tower, which the
# SD tool optimizes as "unet": same attention/layernorm fusions, no text-only ones)
MODEL_TYPES = {
    "text_encoder": "clip",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
    "safety_checker": "unet",
}


def _heads_fix(fusion_class: type) -> type:
    """onnxruntime's UNet attention fusion with its head count read by `.item()`.

    `FusionAttentionUnet.get_num_heads` does `int()` of a one-element array for graphs
    from torch 2 (fusion_attention_unet.py), a TypeError since numpy 2.4; that stopped
    every attention fusion. Same logic, numpy-2.4-safe; nothing of onnxruntime is patched.
    """

    class Fusion(fusion_class):  # type: ignore[misc, valid-type]
        def get_num_heads(self, reshape_q: Any, is_torch2: bool = False) -> int:
            if not is_torch2:  # indexes a 4-vector: a 0-d value, fine under numpy 2.4
                return int(super().get_num_heads(reshape_q, is_torch2))
            parent = self.model.get_parent(reshape_q, 1)  # Concat [0, 0, heads, head_size]
            if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
                return 0
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1 and int(value.item()) > 0:
                return int(value.item())
            return 0

    return Fusion


def _unet_model_class() -> type:
    """onnxruntime's UnetOnnxModel, its multi-head attention fusion built on `_heads_fix`."""
    from onnxruntime.transformers.fusion_attention_unet import FusionAttentionUnet
    from onnxruntime.transformers.onnx_model_unet import UnetOnnxModel

    fusion = _heads_fix(FusionAttentionUnet)

    class Unet(UnetOnnxModel):  # type: ignore[misc, valid-type]
        def fuse_multi_head_attention(self, options: Any = None) -> None:
            # as UnetOnnxModel.fuse_multi_head_attention (self-, then cross-attention),
            # identical in onnxruntime 1.30 and 1.32 (checked); the test of the demo UNet's
            # fused attention count catches a drift
            for cross in (False, True):
                packed = options is None or (options.enable_packed_kv if cross
                                             else options.enable_packed_qkv)
                fusion(self, self.hidden_size, self.num_heads, is_cross_attention=cross,
                       enable_packed_qkv=packed and not cross,
                       enable_packed_kv=packed and cross).apply()

    return Unet


# The CUDA BiasSplitGelu kernel takes only these widths (its bias length, 2x the
# feed-forward width: SD v1's 2560/5120/10240) and fails at run time on any other
# (onnxruntime/contrib_ops/cuda/diffusion/bias_split_gelu.cc); narrower models (the
# demo) keep the plain Add/Split/Gelu/Mul.
BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 6144, 10240, 12288)


def _unsupported_bias_split_gelu(model: Any) -> list[int]:
    """Bias lengths of fused BiasSplitGelu nodes the CUDA kernel cannot run."""
    widths = []
    for node in model.model.graph.node:
        if node.op_type == "BiasSplitGelu":
            bias = model.get_initializer(node.input[1])
            width = int(np.prod(bias.dims)) if bias is not None else -1
            if width not in BIAS_SPLIT_GELU_WIDTHS:
                widths.append(width)
    return widths


CUDA_ONLY = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm",
             "enable_bias_splitgelu", "enable_packed_qkv", "enable_packed_kv", "enable_bias_add")


def _optimize(onnx_path: Path, model_type: str, attention: bool,
              bias_split_gelu: bool = True, cpu: bool = False) -> Any:
    """`optimize_model(opt_level=0, use_gpu=not cpu)` (Python fusions only, no ORT
    session), with the UNet class from `_unet_model_class` (optimizer.py
    optimize_by_fusion); `cpu` leaves out the fusions only CUDA can run."""
    import onnx
    import onnxruntime
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    options = FusionOptions(model_type)
    options.enable_attention = attention
    options.enable_bias_splitgelu = bias_split_gelu
    for name in CUDA_ONLY if cpu else ():
        setattr(options, name, False)
    model_class = _unet_model_class() if model_type == "unet" else MODEL_TYPES[model_type][0]
    model = model_class(onnx.load_model(str(onnx_path)), 0, 0)  # heads, hidden: from the graph
    model.optimize(options)
    model.topological_sort()
    model.model.producer_name = "onnxruntime.transformers"
    model.model.producer_version = onnxruntime.__version__
    return model


def optimize_fp16(onnx_path: Path, out_dir: Path, graph: str, external: bool,
                  warn: Callable[[str], None] = print,
                  log: Callable[[str], None] | None = None) -> Path:
    """Write `out_dir/<graph>.onnx` (+ `<graph>.onnx.data` when `external`, as for a
    source graph that had external data) and return its path. `log` gets one line
    counting the fused operators (MultiHeadAttention, GroupNorm, ...)."""
    return _write(onnx_path, out_dir, graph, external, warn, log, cpu=False)


def optimize_fp32_cpu(onnx_path: Path, out_dir: Path, graph: str, external: bool,
                      warn: Callable[[str], None] = print,
                      log: Callable[[str], None] | None = None) -> Path:
    """As optimize_fp16, for ONNX Runtime's CPU provider: fp32, CPU fusions only."""
    return _write(onnx_path, out_dir, graph, external, warn, log, cpu=True)


def _write(onnx_path: Path, out_dir: Path, graph: str, external: bool,
           warn: Callable[[str], None], log: Callable[[str], None] | None, cpu: bool) -> Path:
    model_type = MODEL_TYPES[graph]
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its INFO lines are not ours
    try:
        failed = None
        try:
            model = _optimize(onnx_path, model_type, attention=True, cpu=cpu)
        except (TypeError, ValueError, IndexError) as e:
            # the attention pattern matcher is the fragile part (numpy 2.4 broke it once,
            # see _heads_fix): a graph without that fusion still runs, slower
            failed = f"{type(e).__name__}: {e}"
        if failed is not None:  # outside the except: the first try's graph is freed
            warn(f"{graph}: onnxruntime's attention fusion failed ({failed}); built without "
                 f"it (slower attention)")
            model = _optimize(onnx_path, model_type, attention=False, cpu=cpu)
        if not cpu and _unsupported_bias_split_gelu(model):  # a narrow model: all but that
            del model  # not two graphs in memory at once
            model = _optimize(onnx_path, model_type, attention=failed is None,
                              bias_split_gelu=False)
        if log is not None:
            fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
            log(f"{graph}: fused " + (", ".join(f"{v} {k}" for k, v in sorted(fused.items()))
                                      or "nothing"))
        if not cpu:
            model.convert_float_to_float16(keep_io_types=True)
    finally:
        quiet.setLevel(level)
    out = out_dir / f"{graph}.onnx"
    model.save_model_to_file(str(out), use_external_data_format=external)
    return out

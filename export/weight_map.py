"""The name map LoRA needs: which ONNX initializer holds which torch parameter, and where
its bytes are in the bundle's files.

torch.onnx.export keeps a parameter's name when it stays an initializer as is
(`unet.conv_in.weight`), but the weight of a Linear without bias becomes a transposed,
constant-folded `onnx::MatMul_1640`, so names alone cannot say where a LoRA's delta goes
(TensorRT #4090). Matched here by content instead: every Linear/Conv weight (2+ dims) of
the module is looked up, as is and transposed, among the graph's initializers by the
bytes themselves. Random or trained weights are unique; a weight whose bytes occur twice
is left out (ambiguous), and so is one the exporter folded into something else.

Each entry records the byte range of the initializer's data in the graph file or its
external data file, so the runtime (no onnx package) reads base weights directly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from runtime.cache import LORA_MIN_BYTES

# smaller tensors are not LoRA targets (and may repeat by chance); the runtime's LoRA-ready
# graph stores tensors from this size on externally (shape constants, smaller, stay inline)
MIN_BYTES = LORA_MIN_BYTES


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _inline_offsets(path: Path, model: onnx.ModelProto) -> dict[str, int]:
    """Byte offset of each inline initializer's raw data in the graph file. They are
    serialized in graph order, so one forward pass finds them all (the first match after
    the previous one: a random or trained weight's bytes do not occur by chance)."""
    data, pos, out = path.read_bytes(), 0, {}
    for t in model.graph.initializer:
        if uses_external_data(t) or len(t.raw_data) < MIN_BYTES:
            continue
        at = data.find(t.raw_data, pos)
        if at >= 0:
            out[t.name] = at
            pos = at + len(t.raw_data)
    return out


def weight_map(graph: Path, module: torch.nn.Module) -> dict[str, list]:
    """{parameter name (the module's own): [initializer, transposed, file, offset, shape]}
    for `module`'s Linear/Conv weights in the exported graph file `graph`; shape is the
    initializer's, float32 little-endian at `offset` in `file` (a name in the bundle)."""
    model = onnx.load(str(graph), load_external_data=False)
    by_digest: dict[str, list[onnx.TensorProto]] = {}
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            with open(graph.parent / info.location, "rb") as f:
                f.seek(info.offset or 0)
                raw = f.read(info.length)
            a = np.frombuffer(raw, np.float32).reshape(tuple(t.dims))
        else:
            a = numpy_helper.to_array(t)
        if a.nbytes >= MIN_BYTES:
            by_digest.setdefault(_digest(a), []).append(t)
    params = {n: p.detach().float().numpy() for n, p in module.named_parameters() if p.dim() >= 2}
    digests = {n: _digest(a) for n, a in params.items()}  # each hashed once (GBs for a UNet)
    seen: dict[str, int] = {}
    for d in digests.values():
        seen[d] = seen.get(d, 0) + 1
    out: dict[str, list] = {}
    inline = _inline_offsets(graph, model)
    for name, a in params.items():
        if seen[digests[name]] > 1:
            continue  # two parameters with the same bytes: which is which is unknown
        for transposed in (False, True):
            if transposed and a.ndim != 2:
                break
            hits = by_digest.get(_digest(a.T) if transposed else digests[name], [])
            if len(hits) != 1:
                continue
            t = hits[0]
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                out[name] = [t.name, transposed, info.location, int(info.offset or 0), list(t.dims)]
            elif t.name in inline:
                out[name] = [t.name, transposed, graph.name, inline[t.name], list(t.dims)]
            break
    return out

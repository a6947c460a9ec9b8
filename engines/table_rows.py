"""The text encoder's graph with zero rows after its token-embedding table, for refittable
TensorRT plans: a built plan's tensors cannot grow, so textual-inversion embeddings are
refitted into rows kept for them (runtime/embeddings.py TABLE_ROWS). The rows are zeros
and no token id reaches them until an embedding is refitted there, so the plan computes
what the bundle's graph does."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def with_table_rows(src: Path, initializer: str, rows: int, out: Path) -> Path:
    """Write `src` with initializer `initializer` [V, C] grown to [V + rows, C] (zeros) to
    `out` (a .onnx beside its .onnx.data, in a folder of its own), for TensorRT's parser."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))  # with its external data: the text encoder is < 2 GB
    table = next((t for t in model.graph.initializer if t.name == initializer), None)
    if table is None:
        raise ValueError(f"{src.name} has no initializer {initializer}")
    base = numpy_helper.to_array(table)
    if base.ndim != 2:
        raise ValueError(f"{initializer} is {list(base.shape)}, not a [rows, width] table")
    grown = np.zeros((base.shape[0] + rows, base.shape[1]), base.dtype)
    grown[:base.shape[0]] = base
    table.CopyFrom(numpy_helper.from_array(grown, initializer))
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=1024)
    return out

"""The trained demo's weights file: fp16 safetensors of its text encoder, UNet and VAE
(`text_encoder.*`, `unet.*`, `vae.*` keys, as the modules name their parameters).

The token table is the one exception. The captions use 17 of CLIP's 49408 tokens,
and only those rows were ever trained, so the file keeps those rows and their ids
(TABLE_IDS, TABLE_ROWS) instead of 3 MB of zeros. Loading puts them back into a table
of zeros; every other row of the model's table is zero.
"""

from __future__ import annotations

from pathlib import Path

import torch

TABLE_IDS = "text_encoder.token_table_ids"  # int64 [K]: the rows kept
TABLE_ROWS = "text_encoder.token_table_rows"  # fp16 [K, hidden]
MODULES = ("text_encoder", "unet", "vae")


def table_key(text_encoder: torch.nn.Module) -> str:
    """The token table's key in the file ([vocab, hidden]; transformers' own name for it
    varies between versions)."""
    table = text_encoder.get_input_embeddings().weight
    (key,) = [k for k, v in text_encoder.state_dict(keep_vars=True).items() if v is table]
    return f"text_encoder.{key}"


@torch.no_grad()
def save(path: Path, modules: dict[str, torch.nn.Module], used: torch.Tensor,
         made_by: dict[str, str] | None = None) -> None:
    """fp16 weights of `modules` (keyed by MODULES), the token table cut to the rows of
    the token ids in `used` (every caption's ids, BOS/EOS and padding included);
    `made_by` (the training run's settings) goes into the file's metadata."""
    from safetensors.torch import save as to_bytes

    from runtime.files import write_atomic

    state = {f"{n}.{k}": (v.detach().half() if v.is_floating_point() else v).contiguous()
             for n in MODULES for k, v in modules[n].state_dict().items()}
    ids = used.unique().to(torch.int64)
    state[TABLE_IDS] = ids
    state[TABLE_ROWS] = state.pop(table_key(modules["text_encoder"]))[ids].contiguous()
    write_atomic(path, to_bytes(state, metadata=made_by))  # a few MB


@torch.no_grad()
def load(path: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Load a `save` file into `modules` (strict: every key of each module, nothing
    else); the token table's other rows become zero. A file that is missing, not
    safetensors or of another config raises ExportError, one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from export.errors import ExportError

    again = "restore it (git checkout) or retrain: python -m export.demo_model.train"
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ExportError(f"cannot read the demo weights {path}: {e}; {again}") from None
    try:
        ids, rows = state.pop(TABLE_IDS), state.pop(TABLE_ROWS)
    except KeyError:
        raise ExportError(f"{path}: not a demo weights file (no {TABLE_IDS}); {again}") from None
    extra = {k for k in state if k.split(".", 1)[0] not in MODULES}
    if extra:
        raise ExportError(f"{path}: unexpected weights {sorted(extra)[:3]}; {again}")
    try:
        table = modules["text_encoder"].get_input_embeddings().weight
        full = torch.zeros(table.shape, dtype=rows.dtype)
        full[ids] = rows
        state[table_key(modules["text_encoder"])] = full
        for name in MODULES:
            own = {k[len(name) + 1:]: v.float() if v.is_floating_point() else v
                   for k, v in state.items() if k.startswith(f"{name}.")}
            modules[name].load_state_dict(own, strict=True)
            modules[name].eval()
    except (RuntimeError, IndexError) as e:  # shapes or names of another config
        msg = str(e).strip().splitlines()[0]
        raise ExportError(f"{path} does not fit the demo's config (export/configs.py DEMO "
                          f"changed?): {msg}; {again}") from None

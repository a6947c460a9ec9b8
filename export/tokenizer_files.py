"""A model's CLIP tokenizer -> the bundle's `tokenizer/vocab.json` + `merges.txt`.

Hub folders of v1.x models have vocab.json + merges.txt (copied as they are); folders
saved by transformers 5 have only `tokenizer.json`, whose BPE vocab and merges are
written out in the same layout as export.clip_vocab.write_tokenizer_files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from export.errors import ExportError

FILES = ("vocab.json", "merges.txt")


def has_tokenizer(src: Path) -> bool:
    return all((src / f).is_file() for f in FILES) or (src / "tokenizer.json").is_file()


def copy_tokenizer(src: Path, dest: Path) -> None:
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if all((src / f).is_file() for f in FILES):
        for f in FILES:
            shutil.copyfile(src / f, dest / f)
        return
    try:
        model = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        if model["type"] != "BPE":
            raise ValueError(f"a {model['type']} tokenizer, not BPE")
        vocab, merges = model["vocab"], model["merges"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"cannot read the CLIP tokenizer in {src}: {e}") from None
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # ["a", "b"] or "a b"
    (dest / "vocab.json").write_text(
        json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges),
                                     encoding="utf-8")

"""OpenAI CLIP's BPE vocabulary as Hugging Face tokenizer files (vocab.json + merges.txt).

Source: `assets/bpe_simple_vocab_16e6.txt.gz`, the file OpenAI's CLIP ships (see
assets/README.md). The conversion follows `SimpleTokenizer.__init__` in openai/CLIP's
`clip/simple_tokenizer.py`; the result has the content of the `tokenizer/` folder of
CompVis/stable-diffusion-v1-4 (= openai/clip-vit-large-patch14):

  vocab.json   49408 ids: 256 byte chars, the same 256 + "</w>", 48894 merged pairs,
               then <|startoftext|> 49406 and <|endoftext|> 49407
  merges.txt   "#version: 0.2" header line, then the 48894 merges in rank order

Stdlib (and runtime.bundle) only, so the export stage and tests can call it without torch.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from runtime.bundle import BOS, EOS

BPE_VOCAB_GZ = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # 48894: the vocabulary size CLIP was trained with, minus bytes/specials


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map (openai/CLIP simple_tokenizer.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def read_merges(gz_path: Path = BPE_VOCAB_GZ) -> list[str]:
    """The 48894 merges ("a b" strings) CLIP uses, in rank order."""
    lines = gzip.open(gz_path, "rb").read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]  # line 0 is a version header
    if len(merges) != N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{gz_path} is not CLIP's bpe_simple_vocab_16e6 file")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    """Token -> id exactly as openai/CLIP builds it (49408 entries)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab


def write_tokenizer_files(dest_dir: Path) -> None:
    """Write `vocab.json` and `merges.txt` (Hugging Face CLIP format) into `dest_dir`.

    Byte-for-byte what transformers' CLIPTokenizer.save_vocabulary wrote for v1-4's
    tokenizer folder: vocab.json sorted, indent 2, non-ASCII kept; merges.txt one merge
    per line after "#version: 0.2". Deterministic, so exports are reproducible.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    merges = read_merges()
    vocab = build_vocab(merges)
    (dest_dir / "vocab.json").write_text(
        json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")

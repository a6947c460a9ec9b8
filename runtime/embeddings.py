"""Textual inversion: embeddings that add words to the prompt's vocabulary.

A file holds one or more vectors [n, C] for one new word, in either format people have:
diffusers' (`learned_embeds.safetensors`: one tensor named by its token, [C] or [n, C])
or AUTOMATIC1111's (`emb_params` [n, C]; the token is the file's name, as A1111 names
it). Only safetensors are read; pickles (.pt/.bin) are refused, never opened.

As diffusers' load_textual_inversion: the token, and for n > 1 vectors `token_1` ..
`token_{n-1}`, are added to the tokenizer (ids from the vocabulary's size on) and the
text encoder's token-embedding table gets their rows; a prompt's `token` becomes
`token token_1 ...` before it is tokenized (maybe_convert_prompt).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.bundle import TOKEN_TABLE  # noqa: F401  (re-exported: its users import it here)
from runtime.cache import TABLE_ROWS  # noqa: F401

A1111_KEY = "emb_params"
MAX_VECTORS = 75  # a prompt chunk's tokens: more could never be used at once


class EmbeddingError(ValueError):
    """An embedding file this model cannot use; the message is one line."""


@dataclass(frozen=True, eq=False)
class Embedding:
    path: Path
    token: str  # the word that stands for it in prompts
    vectors: np.ndarray  # [n, C] float32

    @property
    def tokens(self) -> list[str]:  # what the tokenizer gets, one per vector
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]


def read_embedding(path: str | Path, width: int) -> Embedding:
    """The embedding at `path` for a text encoder of hidden width `width` (EmbeddingError)."""
    from runtime.lora import PICKLE_SUFFIXES, LoraError, read_tensors  # safetensors: when used

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise EmbeddingError(f"{path}: {path.suffix} files are pickles, which are never "
                             "loaded; use the embedding's .safetensors file")
    try:
        tensors, _ = read_tensors(path)
    except LoraError as e:
        raise EmbeddingError(str(e)) from None
    if A1111_KEY in tensors and len(tensors) == 1:
        token, vectors = path.stem, tensors[A1111_KEY]
    elif len(tensors) == 1:
        token, vectors = next(iter(tensors.items()))
    else:  # SDXL's clip_l + clip_g, or not an embedding at all
        raise EmbeddingError(f"{path}: not a textual-inversion embedding for this model "
                             f"(tensors {sorted(tensors)[:4]}; expected one, or {A1111_KEY})")
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise EmbeddingError(f"{path}: vectors of shape {list(vectors.shape)}; this model's "
                             f"text encoder takes [n, {width}] (an embedding for another model?)")
    if not 1 <= len(vectors) <= MAX_VECTORS:
        raise EmbeddingError(f"{path}: {len(vectors)} vectors; 1 to {MAX_VECTORS} fit a prompt")
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: its vectors contain NaN or inf")
    if not token or re.search(r"\s", token) or len(token) > 100:
        raise EmbeddingError(f"{path}: its token {token!r} must be one word (no spaces), "
                             "at most 100 characters; rename the file")
    return Embedding(path, token, np.ascontiguousarray(vectors, np.float32))


def _norm(word: str) -> str:  # what the tokenizer matches added words on (tokenizer.py)
    return unicodedata.normalize("NFC", word).lower()


def check_unique(embeddings: Sequence[Embedding], vocab: dict[str, int]) -> None:
    """Each new word must be new to the vocabulary and to the other embeddings, as the
    tokenizer sees words: lowercased (`Cat` would be matched in "a cat")."""
    known = {_norm(w) for w in vocab}
    seen: dict[str, Path] = {}
    for e in embeddings:
        for t in e.tokens:
            if t in vocab or _norm(t) in known:
                raise EmbeddingError(f"{e.path}: its word {t!r} is a word of the vocabulary "
                                     "already; rename the file (A1111) or the token")
            if _norm(t) in seen:
                raise EmbeddingError(f"{e.path}: its word {t!r} is also {seen[_norm(t)]}'s")
            seen[_norm(t)] = e.path


def expand(text: str, embeddings: Sequence[Embedding]) -> str:
    """diffusers' maybe_convert_prompt: `word` -> `word word_1 ...` for multi-vector
    embeddings, wherever the tokenizer would match the word (case-insensitively, the
    longest word first, as its added-word matching; A1111 likewise uses every vector)."""
    multi = {_norm(e.token): " ".join(e.tokens) for e in embeddings if len(e.vectors) > 1}
    if not multi:
        return text
    pattern = "|".join(re.escape(w) for w in sorted(multi, key=len, reverse=True))
    return re.sub(pattern, lambda m: multi[_norm(m.group(0))], text, flags=re.IGNORECASE)

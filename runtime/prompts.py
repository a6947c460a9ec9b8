"""Long prompts and (emphasis:1.3), as AUTOMATIC1111's stable-diffusion-webui does them.

Ported from A1111's modules/prompt_parser.py (`parse_prompt_attention`),
modules/sd_hijack_clip.py (`TextConditionalModel.tokenize_line`) and
modules/sd_emphasis.py (`EmphasisOriginal`), with its default options
(emphasis "Original", comma_padding_backtrack 20). The pipeline uses them as

    empty = encode_prompt(tok, "", 1)
    ids, weights = pad_chunks([encode_prompt(tok, t, n) for t in texts], empty)  # [P, k, 77]
    hidden[:, j] = text_encoder(ids[:, j])                                         # [P, k, 77, C]
    cond = emphasize(hidden, weights).reshape(P, k * 77, C)

A prompt is split into chunks of 75 tokens, each encoded on its own as BOS + 75 + EOS
(EOS is also SD v1's pad token) and concatenated along the token axis; a prompt of at
most 75 tokens without ( ) [ ] \\ or BREAK gives exactly the ids diffusers feeds (a
literal <|endoftext|> in it stays that token, as in runtime.tokenizer and transformers).

Deviations from A1111, on purpose:
  * The emphasis mean is taken per prompt and per chunk, not over the whole batch of
    prompts of a chunk: one image's conditioning never depends on the other prompts of
    the call (A1111 usually encodes one prompt at a time, where the two agree).
  * Prompts of a call with fewer chunks are padded with chunks of the empty prompt, as
    A1111's "pad_cond_uncond" option does (its default instead runs the UNet on cond
    and uncond separately, at their own lengths; a batched engine needs one length).
  * At most `max_chunks` chunks; the tokens of later chunks are counted in `dropped`.
  * No textual-inversion embeddings, no prompt editing ([a:b:0.5]) or AND.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.bundle import MAX_TOKENS
from runtime.tokenizer import ClipTokenizer

CHUNK = MAX_TOKENS - 2  # 75 prompt tokens per chunk, between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's opts.comma_padding_backtrack default
ROUND, SQUARE = 1.1, 1 / 1.1  # (x) and [x] multipliers

# A1111's re_attention: escapes, brackets, ":weight)", plain text runs, a lone ":"
RE_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Text runs and their weights: "a (b:1.3) [c]" -> [("a ", 1.0), ("b", 1.3), (" ", 1.0), ("c", 1/1.1)].

    (x) multiplies by 1.1, (x:w) by w, [x] divides by 1.1; \\( \\) \\[ \\] \\\\ are literal;
    unclosed brackets apply to the end; a BREAK word in plain text gives ("BREAK", -1);
    adjacent runs of equal weight are merged; "" gives [("", 1.0)].
    """
    res: list[list] = []  # [text, weight], mutated by closing brackets
    round_open: list[int] = []  # index in res where each open "(" starts
    square_open: list[int] = []

    def multiply(start: int, m: float) -> None:
        for r in res[start:]:
            r[1] *= m

    for match in RE_ATTENTION.finditer(text):
        tok, weight = match.group(0), match.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])  # a lone "\" escapes nothing and vanishes, as in A1111
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                w = float(weight)
            except ValueError:  # A1111 fails the same way on "(a:1.2.3)"
                raise ValueError(f"prompt weight {weight!r} is not a number") from None
            multiply(round_open.pop(), w)
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(RE_BREAK.split(tok)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not res:
        res = [["", 1.0]]

    merged = [res[0]]
    for r in res[1:]:
        if r[1] == merged[-1][1]:
            merged[-1][0] += r[0]
        else:
            merged.append(r)
    return [(t, w) for t, w in merged]


@dataclass(frozen=True, eq=False)
class PromptTokens:
    """One prompt's chunks: k >= 1 rows of BOS, 75 tokens (EOS padded), EOS."""

    ids: np.ndarray  # [k, 77] int32
    weights: np.ndarray  # [k, 77] float32; 1.0 at BOS, EOS and padding
    dropped: int  # prompt tokens in chunks past max_chunks, cut


MAX_WEIGHT = 1e4  # |weight| far past any use (A1111 users stay in 0..2; 49 nested "(" is 107):
# bigger ones only push the emphasis mean restore toward float32 overflow


def parse_weights(text: str) -> list[tuple[str, float]]:
    """parse_prompt_attention, refusing (ValueError, one line) a malformed weight and one
    that float32 emphasis cannot use; needs no tokenizer, so the CLI checks before loading."""
    parsed = parse_prompt_attention(text)
    for _, w in parsed:
        if not (math.isfinite(w) and abs(w) <= MAX_WEIGHT):  # BREAK is -1: fine
            raise ValueError(f"a prompt weight of {w:g} is outside [-{MAX_WEIGHT:g}, "
                             f"{MAX_WEIGHT:g}] in {text[:60]!r}")
    return parsed


def encode_prompt(tokenizer: ClipTokenizer, text: str, max_chunks: int,
                  chunked: bool = True) -> PromptTokens:
    """A1111's tokenize_line: each parsed run is tokenized on its own, then packed into
    chunks of 75. When a chunk is full and its last comma is at most 20 tokens back, the
    tokens after that comma move to the next chunk; BREAK starts a new chunk. Not
    `chunked` (a model that takes one chunk): no comma backtrack, BREAK is a plain
    separator, so the first 75 tokens are kept, as diffusers truncates."""
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
    parsed = parse_weights(text)
    encodings = tokenizer.tokenizer.encode_batch([t for t, _ in parsed], add_special_tokens=False)
    comma = tokenizer.tokenizer.token_to_id(",</w>")  # None: no comma token, no backtrack

    chunks: list[list[tuple[int, float]]] = [[]]  # (token, weight); the last one is being filled
    last_comma = -1  # index of the last comma in chunks[-1]
    for enc, (run, weight) in zip(encodings, parsed, strict=True):
        if run == "BREAK" and weight == -1:
            if not chunked:
                continue
            chunks.append([])
            last_comma = -1
            continue
        for token in enc.ids:
            chunk = chunks[-1]
            if token == comma:
                last_comma = len(chunk)
            elif (chunked and len(chunk) == CHUNK and last_comma != -1
                  and CHUNK - last_comma <= COMMA_BACKTRACK):
                chunks[-1:] = [chunk[:last_comma + 1], chunk[last_comma + 1:]]  # split after the comma
                last_comma = -1
            if len(chunks[-1]) == CHUNK:
                chunks.append([])
                last_comma = -1
            chunks[-1].append((token, weight))
    if len(chunks) > 1 and not chunks[-1]:  # a trailing BREAK or a full last chunk
        chunks.pop()

    kept = chunks[:max_chunks]
    empty = tokenizer.encode([""])[0]  # [1, 77]: BOS, then EOS (SD v1's pad) to the end
    ids = np.repeat(empty, len(kept), axis=0)  # [k, 77] int32
    weights = np.ones((len(kept), MAX_TOKENS), dtype=np.float32)  # [k, 77]
    for row, chunk in enumerate(kept):
        ids[row, 1:1 + len(chunk)] = [t for t, _ in chunk]
        weights[row, 1:1 + len(chunk)] = [w for _, w in chunk]
    ids.flags.writeable = weights.flags.writeable = False
    return PromptTokens(ids, weights, sum(len(c) for c in chunks[max_chunks:]))


def pad_chunks(prompts: Sequence[PromptTokens], empty: PromptTokens) -> tuple[np.ndarray, np.ndarray]:
    """The prompts of one call at one chunk count k (the most any has): ids [P, k, 77]
    int32 and weights [P, k, 77] float32, shorter prompts followed by `empty`'s chunk
    (encode_prompt(tok, "", 1): A1111's empty_chunk, and its pad_cond_uncond padding)."""
    if not prompts:
        raise ValueError("pad_chunks needs at least one prompt")
    if empty.ids.shape != (1, MAX_TOKENS):
        raise ValueError(f"empty must be one chunk [1, {MAX_TOKENS}], got {empty.ids.shape}")
    k = max(len(p.ids) for p in prompts)
    ids = np.empty((len(prompts), k, MAX_TOKENS), dtype=np.int32)  # [P, k, 77]
    ids[:] = empty.ids  # every chunk starts as the empty prompt's
    weights = np.ones(ids.shape, dtype=np.float32)  # [P, k, 77]; the empty chunk's are all 1
    for i, p in enumerate(prompts):
        ids[i, :len(p.ids)] = p.ids
        weights[i, :len(p.weights)] = p.weights
    return ids, weights


def emphasize(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on text-encoder output, per [77, C] chunk of one prompt.

    hidden [..., 77, C], weights [..., 77] -> float32 [..., 77, C]: each token's vector is
    scaled by its weight, then the chunk is rescaled to its former mean (sd_emphasis.py).
    A chunk whose weights are all 1.0 comes back bit for bit. As in A1111, a chunk whose
    weighted mean is 0 gives non-finite values.
    """
    z = np.asarray(hidden, dtype=np.float32)  # [..., 77, C]
    w = np.asarray(weights, dtype=np.float32)[..., None]  # [..., 77, 1]
    if z.shape[:-1] != w.shape[:-1]:
        raise ValueError(f"hidden {z.shape} and weights {np.shape(weights)} disagree")
    original_mean = z.mean(axis=(-2, -1), keepdims=True)  # [..., 1, 1]
    zw = z * w
    new_mean = zw.mean(axis=(-2, -1), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = zw * (original_mean / new_mean)
    plain = (w == 1.0).all(axis=(-2, -1), keepdims=True)  # [..., 1, 1]
    return np.where(plain, z, out)

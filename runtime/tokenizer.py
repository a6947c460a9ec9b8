"""CLIP's text tokenizer for the runtime: the `tokenizers` library, no transformers.

Built from a bundle's `tokenizer/` folder (vocab.json + merges.txt) with the same
pipeline that transformers' CLIPTokenizer (transformers/models/clip/tokenization_clip.py)
builds, which is what diffusers' StableDiffusionPipeline loads for v1.x:

  normalize    NFC, runs of whitespace -> " ", lowercase
  pre-split    CLIP's regex (specials, contractions, letter runs, single digits,
               punctuation runs), then byte-level (GPT-2's byte -> unicode map)
  model        BPE with end-of-word suffix "</w>"
  post         <|startoftext|> ... <|endoftext|>

and `encode` gives what the pipeline passes to the text encoder:
`tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`, i.e. BOS,
at most 75 tokens, EOS, then <|endoftext|> as padding.

Unlike OpenAI's original tokenizer this does not run ftfy or html.unescape (neither does
transformers' CLIPTokenizer since 5.0; see tests/test_tokenizer.py for what that changes).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from runtime.bundle import BOS, EOS, MAX_TOKENS

# transformers' CLIPTokenizer split pattern (it keeps openai/CLIP's, minus the ftfy step)
CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
              r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


def build_clip_tokenizer(vocab_json: Path, merges_txt: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to transformers' CLIPTokenizer backend for these files."""
    vocab, merges = BPE.read_file(str(vocab_json), str(merges_txt))  # reads "#version" header
    for special in (BOS, EOS):
        if special not in vocab:
            raise ValueError(f"{vocab_json} has no {special} token; not a CLIP vocabulary")
    tok = Tokenizer(BPE(vocab, merges, dropout=None, unk_token=EOS, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    # A literal "<|endoftext|>" in a prompt is that token (case-sensitive), as in transformers.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    # BOS $A EOS (RobertaProcessing, as transformers uses; pairs are never encoded here)
    tok.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # ids -> text; "</w>" is left in place
    return tok


MAX_FILE_BYTES = 64 << 20
MAX_TOKEN_ID = 1 << 20  # CLIP's go to 49407; past 2**31 they would overflow int32 input_ids


class ClipTokenizer:
    """Prompts -> fixed-length CLIP token ids. Construct once per bundle, encode many times."""

    def __init__(self, folder: Path | str, max_length: int = MAX_TOKENS) -> None:
        folder = Path(folder)
        vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab_json, merges_txt):
            if not f.is_file():
                raise FileNotFoundError(f"tokenizer file missing: {f}")
            if f.stat().st_size > MAX_FILE_BYTES:  # CLIP's are 1.6 MB and 0.5 MB
                raise ValueError(f"{f} is larger than {MAX_FILE_BYTES >> 20} MiB")
        self.tokenizer = build_clip_tokenizer(vocab_json, merges_txt)
        top = max(self.tokenizer.get_vocab().values())
        if top >= MAX_TOKEN_ID:  # ids are int32 in the graph's input_ids
            raise ValueError(f"{vocab_json} has a token id {top}, at or past {MAX_TOKEN_ID}")
        self.max_length = max_length
        self.bos_id = self.tokenizer.token_to_id(BOS)  # 49406 in CLIP's vocabulary
        self.eos_id = self.tokenizer.token_to_id(EOS)  # 49407; also the pad id

    def with_words(self, words: list[str]) -> ClipTokenizer:
        """A new tokenizer with these words added (textual inversion), as transformers'
        add_tokens adds them: matched in the lowercased text before BPE, with ids from
        the vocabulary's size on, in order. This one is left as it is."""
        out = copy.copy(self)
        out.tokenizer = Tokenizer.from_str(self.tokenizer.to_str())  # no files read again
        size = out.tokenizer.get_vocab_size(with_added_tokens=True)
        out.tokenizer.add_tokens([AddedToken(w, normalized=True, special=False) for w in words])
        ids = [out.tokenizer.token_to_id(w) for w in words]
        if ids != list(range(size, size + len(words))):  # a word there already, or twice
            raise ValueError(f"cannot add {words[:3]}...: some are words of the vocabulary")
        return out

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Token ids [B, max_length] int32 and, per prompt, how many tokens truncation dropped.

        Row i is BOS, the first max_length-2 tokens of prompt i, EOS, then EOS padding;
        dropped[i] counts the prompt's tokens beyond max_length-2 (0 when it fits).
        """
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        n = len(prompts)
        ids = np.full((n, self.max_length), self.eos_id, dtype=np.int32)  # [B, 77] pad = EOS
        dropped: list[int] = []
        for i, enc in enumerate(self.tokenizer.encode_batch(list(prompts))):
            row = enc.ids  # [BOS, t_1 .. t_k, EOS], untruncated: k + 2 ids
            if len(row) > self.max_length:
                row = row[:self.max_length - 1] + [self.eos_id]  # truncation keeps the EOS
            ids[i, :len(row)] = row
            dropped.append(max(0, len(enc.ids) - self.max_length))
        return ids, dropped

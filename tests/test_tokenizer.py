"""runtime.tokenizer and export.clip_vocab against transformers' CLIPTokenizer.

The reference is what diffusers' StableDiffusionPipeline loads for v1-4: its `tokenizer`
is a transformers `CLIPTokenizer`, called in `encode_prompt` as
`tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`, with
`tokenizer(prompt, padding="longest")` to count what truncation removed.

Slow vs fast: since transformers 5 `CLIPTokenizerFast` is the same class as
`CLIPTokenizer` (the `tokenizers`-backed pipeline); the pure-Python "slow" CLIP tokenizer
of transformers 4.x (ftfy when installed, else BERT's BasicTokenizer) is gone, so there is
no second transformers tokenizer to compare. What does still differ is OpenAI's original
tokenizer, the one CLIP was trained with: `test_differences_from_openai_clip` pins those
differences with a small port of openai/CLIP's simple_tokenizer.py.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from export.clip_vocab import (
    BPE_VOCAB_GZ,
    build_vocab,
    bytes_to_unicode,
    read_merges,
    write_tokenizer_files,
)
from runtime.tokenizer import ClipTokenizer

BOS, EOS, A = 49406, 49407, 320  # <|startoftext|>, <|endoftext|> (= pad), "a</w>"
ASTRONAUT = "a photo of an astronaut riding a horse on mars"
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]

# Awkward prompts: name -> text.
CORPUS = {
    "astronaut": ASTRONAUT,
    "empty": "",  # the pipeline's default negative prompt
    "spaces": "   leading  and   trailing   ",
    "tabs_newlines": "tabs\tand\nnewlines\r\n  here\t",
    "uppercase": "UPPER Case MiXeD",
    "accents": "café naïve résumé Ångström façade",
    "combining": "cafe\u0301 n\u0303 a\u0308",  # decomposed: NFC composes them
    "cjk": "東京の夜景, 赤い提灯 한국어 프롬프트",
    "emoji": "🚀 rocket 👩‍🚀 astronaut 🐴🔥❤️",  # incl. a ZWJ sequence and a variation selector
    "fullwidth": "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ１２３",
    "punct": "!!! ??? ... --- ((masterpiece)), [[best quality]]:1.2 ~~@#$%^&*",
    "contractions": "don't it's we're I've I'm you'll he'd DON'T o'clock rock'n'roll",
    "curly_quotes": "’curly’ “quotes” don’t",
    "numbers": "1234567890 3.14159 1e-5 1,000,000 4k 8K 1920x1080",
    "html_entities": "salt &amp; pepper &lt;tag&gt; &#39;",
    "literal_special": "a <|endoftext|> literal <|startoftext|> special",
    "literal_special_upper": "a <|ENDOFTEXT|> b",  # not a special token to transformers
    "greek_final_sigma": "Ελληνικά ΟΔΟΣ",
    "turkish_ligature": "İstanbul straße ﬁne",
    "odd_spaces": "zero\u200bwidth\u00a0nbsp\u3000ideographic\u2028sep",
    "control_chars": "control\x00\x07chars\x1cfs",
    "long_word": "supercalifragilisticexpialidocious pneumonoultramicroscopic",
    "over_77": "masterpiece, best quality, ultra detailed, " * 30,  # 240 tokens
    "over_77_mixed": ("Ünïcödé 東京 🚀 don't!!! " * 20).strip(),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(d)
    return d


@pytest.fixture(scope="module")
def ours(tok_dir) -> ClipTokenizer:
    return ClipTokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(tok_dir)


def hf_encode(hf, prompt: str) -> tuple[list[int], int]:
    """diffusers' encode_prompt: 77 ids, and how many tokens `padding="longest"` shows removed."""
    ids = hf(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    untruncated = hf(prompt).input_ids  # [BOS, t_1 .. t_k, EOS]
    return ids, max(0, len(untruncated) - 77)


# --- the vocabulary files ------------------------------------------------------------

def test_asset_is_openai_clip_bpe():
    digest = hashlib.sha256(BPE_VOCAB_GZ.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert gzip.open(BPE_VOCAB_GZ).readline().startswith(b'"bpe_simple_vocab_16e6.txt#version')


def test_tokenizer_files_layout(tok_dir):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    # 256 byte chars, the same with </w>, then the merges
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and merges[-1] == ""
    assert len(merges) == 1 + 48894 + 1  # header, merges, final newline
    # Byte sizes of CompVis/stable-diffusion-v1-4's tokenizer/ files; hashes pin the format.
    sizes = {f: (tok_dir / f).stat().st_size for f in ("vocab.json", "merges.txt")}
    assert sizes == {"vocab.json": 1059962, "merges.txt": 524619}
    digests = {f: hashlib.sha256((tok_dir / f).read_bytes()).hexdigest() for f in sizes}
    assert digests == {
        "vocab.json": "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349",
        "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    }


def test_known_ids(ours, hf):
    ids, dropped = ours.encode([ASTRONAUT])  # [1, 77]
    assert ids.dtype == np.int32 and ids.shape == (1, 77) and dropped == [0]
    assert ids[0, :12].tolist() == ASTRONAUT_IDS and (ids[0, 12:] == EOS).all()
    assert hf(ASTRONAUT).input_ids == ASTRONAUT_IDS


# --- agreement with transformers --------------------------------------------------------

def test_same_pipeline_as_transformers(ours, hf):
    """Normalizer, pre-tokenizer, BPE model, specials, post-processor: all identical."""
    assert json.loads(ours.tokenizer.to_str()) == json.loads(hf.backend_tokenizer.to_str())


def test_transformers_has_one_clip_tokenizer():
    transformers = pytest.importorskip("transformers")
    # In transformers 4.x these were two implementations that could disagree (see module doc).
    assert transformers.CLIPTokenizerFast is transformers.CLIPTokenizer


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_matches_transformers(ours, hf, name):
    prompt = CORPUS[name]
    want_ids, want_dropped = hf_encode(hf, prompt)
    ids, dropped = ours.encode([prompt])
    assert ids[0].tolist() == want_ids
    assert dropped == [want_dropped]


def test_batch_equals_one_by_one(ours):
    prompts = list(CORPUS.values())
    ids, dropped = ours.encode(prompts)  # [B, 77]
    assert ids.shape == (len(prompts), 77)
    for i, p in enumerate(prompts):
        one_ids, one_dropped = ours.encode([p])
        assert (ids[i] == one_ids[0]).all() and dropped[i] == one_dropped[0]
    assert dropped[prompts.index(CORPUS["over_77"])] == 240 - 75


@pytest.mark.parametrize("n", [0, 1, 74, 75, 76, 77, 78, 300])
def test_length_boundaries(ours, hf, n):
    """n content tokens ("a" is one token): 75 fit between BOS and EOS, the rest are dropped."""
    prompt = " ".join(["a"] * n)
    ids, dropped = ours.encode([prompt])
    kept = min(n, 75)
    want = [BOS] + [A] * kept + [EOS] * (76 - kept)  # EOS, then EOS padding
    assert ids[0].tolist() == want
    assert dropped == [max(0, n - 75)]
    assert (want, dropped[0]) == hf_encode(hf, prompt)


def test_edge_inputs(ours):
    ids, dropped = ours.encode([])
    assert ids.shape == (0, 77) and ids.dtype == np.int32 and dropped == []
    ids, dropped = ours.encode(["", " \t\n "])  # both tokenize to nothing
    assert ids.tolist() == [[BOS] + [EOS] * 76] * 2 and dropped == [0, 0]
    with pytest.raises(TypeError):
        ours.encode("a single string")


def test_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ClipTokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a CLIP vocabulary"):
        ClipTokenizer(tmp_path)


# --- where transformers (= diffusers, = this runtime) differs from OpenAI's CLIP -----------

def openai_clip_ids(text: str, vocab: dict[str, int],
                    ranks: dict[tuple[str, str], int]) -> list[int]:
    """Token ids (no BOS/EOS) from openai/CLIP clip/simple_tokenizer.py, without ftfy.

    basic_clean = ftfy.fix_text + html.unescape twice; ftfy is replaced by the one of its
    steps that transformers also does (NFC), so what is left to differ is CLIP's own code.
    """
    regex = pytest.importorskip("regex")
    byte_char = bytes_to_unicode()
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
    text = re.sub(r"\s+", " ", text).strip().lower()  # whitespace_clean, then lower()
    pat = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
           r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    ids = []
    for piece in regex.findall(pat, text, regex.IGNORECASE):
        if piece in ("<|startoftext|>", "<|endoftext|>"):  # SimpleTokenizer's bpe cache
            ids.append(vocab[piece])
            continue
        word = [byte_char[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:  # merge the lowest-ranked adjacent pair everywhere, repeat
            best = min(zip(word[:-1], word[1:], strict=True),
                       key=lambda p: ranks.get(p, len(ranks)))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if tuple(word[i:i + 2]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[w] for w in word]
    return ids


# Prompts where OpenAI's tokenizer (what CLIP was trained on) and transformers' give other
# ids, with the reason. The runtime follows transformers, because diffusers does.
OPENAI_DIFFERS = {
    # CLIP's basic_clean html-unescapes twice ("&amp;" -> "&"); transformers does not.
    "html_entities": "html.unescape",
    # Python's str.lower() writes a word-final sigma as "ς"; tokenizers' Lowercase gives "σ".
    "greek_final_sigma": "final sigma",
    # Python's \s counts \x1c-\x1f as whitespace, the Rust regex in tokenizers does not.
    "control_chars": "\\x1c is whitespace to Python",
    # CLIP lowercases first, so "<|ENDOFTEXT|>" becomes the special token; transformers
    # matches specials case-sensitively before normalizing and BPE-splits it instead.
    "literal_special_upper": "specials after lowercasing",
}
# Measured once with ftfy 6.3.1 installed (ftfy is not a test dependency): OpenAI's
# tokenizer then also differs on "fullwidth" (ftfy maps Ｆ -> F, 　 -> space),
# "curly_quotes" (’ “ ” -> ' "), "turkish_ligature" (ﬁ -> fi) and "control_chars"
# (control characters removed). transformers 4.x's slow CLIPTokenizer ran ftfy too when
# installed, and otherwise BERT's BasicTokenizer, which splits CJK per character.


def test_differences_from_openai_clip(hf):
    merges = read_merges()
    vocab = build_vocab(merges)
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    differ = {name for name, text in CORPUS.items()
              if openai_clip_ids(text, vocab, ranks)
              != hf(text, add_special_tokens=False).input_ids}
    assert differ == set(OPENAI_DIFFERS)

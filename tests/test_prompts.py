"""runtime.prompts against AUTOMATIC1111's stable-diffusion-webui.

Oracles: the doctests of A1111's modules/prompt_parser.py `parse_prompt_attention` and the
wiki's Attention/emphasis cheat sheet (literal expected values); for chunking, a small port
of A1111's `TextConditionalModel.tokenize_line` (modules/sd_hijack_clip.py, default options:
backtrack 20, no embeddings) over transformers' CLIPTokenizer, called as A1111 calls it;
for emphasis, A1111's `EmphasisOriginal.after_transformers` (modules/sd_emphasis.py) in
torch, on random data and on the demo CLIPTextModel's output.

Tolerances: emphasis only differs from torch in the order of the float32 mean reductions,
so rtol 1e-5 with atol 1e-6 (random data) or 1e-5 (text encoder output).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from runtime.bundle import demo_bundle
from runtime.prompts import PromptTokens, emphasize, encode_prompt, pad_chunks, parse_prompt_attention
from runtime.tokenizer import ClipTokenizer

BOS, EOS, A, COMMA = 49406, 49407, 320, 267  # <|startoftext|>, <|endoftext|>, "a</w>", ",</w>"


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer(demo_bundle() / "tokenizer")


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(demo_bundle() / "tokenizer")


# --- parse_prompt_attention -------------------------------------------------------------

DOCTESTS = {  # A1111 prompt_parser.py's doctests, outputs as printed there
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
}

WIKI = {  # the wiki's cheat sheet ("Features" > "Attention/emphasis") and its examples
    "a (word)": [("a ", 1.0), ("word", 1.1)],
    "a ((word))": [("a ", 1.0), ("word", 1.1 * 1.1)],  # 1.21
    "a [word]": [("a ", 1.0), ("word", 1 / 1.1)],
    "a (word:1.5)": [("a ", 1.0), ("word", 1.5)],
    "a (word:0.25)": [("a ", 1.0), ("word", 0.25)],
    "a \\(word\\)": [("a (word)", 1.0)],
    "anime_\\(character\\)": [("anime_(character)", 1.0)],
    "a man in a ((tuxedo))": [("a man in a ", 1.0), ("tuxedo", 1.1 * 1.1)],
    "a man in a (tuxedo:1.21)": [("a man in a ", 1.0), ("tuxedo", 1.21)],
    "a (((farm))), daytime": [("a ", 1.0), ("farm", 1.1 * 1.1 * 1.1), (", daytime", 1.0)],
}

EDGES = {  # traced by hand through A1111's loop
    "": [("", 1.0)],
    "(word: 1.5 )": [("word", 1.5)],  # spaces around the weight (A1111 since 1.6)
    "[word:0.25]": [("word:0.25", 1 / 1.1)],  # [] takes no weight: ":0.25" is text
    "(word:1e3)": [("word:1e3", 1.1)],  # not a weight: digits and dots only
    "a )b( c": [("a )b", 1.0), (" c", 1.1)],  # stray ")" is text; "(" runs to the end
    "a ]b": [("a ]b", 1.0)],
    "[(a]": [("a", 1.1 / 1.1)],  # "]" closes the "[", the "(" stays open
    "((a) b": [("a", 1.1 * 1.1), (" b", 1.1)],
    "\\\\ a\\b": [("\\ ab", 1.0)],  # "\\" is a backslash; a lone "\" vanishes
    "(a:-1)": [("a", -1.0)],
    "a: b": [("a: b", 1.0)],  # a ":" outside "(x:w)" is text
    "a BREAK b": [("a", 1.0), ("BREAK", -1), ("b", 1.0)],
    "BREAK": [("", 1.0), ("BREAK", -1), ("", 1.0)],
    "a BREAK BREAK b": [("a", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("b", 1.0)],
    "a break aBREAK BREAKs": [("a break aBREAK BREAKs", 1.0)],  # uppercase whole word only
    "(a BREAK b)": [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)],  # -1.1: tokenized as a word
    "(a) (b) [c]": [("a", 1.1), (" ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 1 / 1.1)],
}


@pytest.mark.parametrize(("text", "expected"), [*DOCTESTS.items(), *WIKI.items(), *EDGES.items()])
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert got == expected  # exact floats: the same multiplications in the same order
    assert all(type(w) is float or w == -1 for _, w in got)


def test_parse_rejects_a_malformed_weight():
    with pytest.raises(ValueError, match="'1.2.3' is not a number"):  # A1111: float() raises too
        parse_prompt_attention("(a:1.2.3)")


# --- encode_prompt ----------------------------------------------------------------------

PLAIN = [  # no ( ) [ ] \ or BREAK: one chunk, exactly what diffusers feeds
    "a photo of an astronaut riding a horse on mars",
    "",
    "   leading  and   trailing\tspaces\n",
    "UPPER Case, MiXeD: colons; and !!! ??? ... ~~@#$%^&* --- don't you'll",
    "1234567890 3.14159 1e-5 1,000,000 4k 1920x1080",
    "東京の夜景, 赤い提灯 🚀 👩‍🚀 café naïve cafe\u0301 ＦＵＬＬ１２３",
    "a <|endoftext|> literal <|startoftext|> special <|ENDOFTEXT|>",  # the specials are tokens
    "a " * 75,  # exactly 75 tokens
    "a, " * 37 + "a",
]


@pytest.mark.parametrize("text", PLAIN)
def test_plain_prompt_equals_the_diffusers_ids(tok, text):
    p = encode_prompt(tok, text, max_chunks=3)
    assert p.ids.shape == (1, 77) and p.ids.dtype == np.int32 and p.weights.dtype == np.float32
    np.testing.assert_array_equal(p.ids[0], tok.encode([text])[0][0])
    assert (p.weights == 1.0).all() and p.dropped == 0
    assert not p.ids.flags.writeable and not p.weights.flags.writeable


def test_weights_follow_tokens_and_specials_weigh_one(tok):
    p = encode_prompt(tok, "a (red:1.5) [cat]", 1)
    red, cat = tok.tokenizer.token_to_id("red</w>"), tok.tokenizer.token_to_id("cat</w>")
    np.testing.assert_array_equal(p.ids[0, :5], [BOS, A, red, cat, EOS])
    np.testing.assert_array_equal(p.weights[0, :4], np.float32([1, 1, 1.5, 1 / 1.1]))
    assert (p.weights[0, 4:] == 1).all() and (p.ids[0, 4:] == EOS).all()


def a_run(n: int) -> str:
    return "a " * n  # n tokens, none a comma


def lengths(p: PromptTokens) -> list[int]:
    """Prompt tokens per chunk (this test's prompts never contain EOS)."""
    return [int((row[1:] != EOS).sum()) for row in p.ids]


@pytest.mark.parametrize(("text", "expected"), [
    (a_run(76), [75, 1]),
    (a_run(200), [75, 75, 50]),
    (a_run(55) + ", " + a_run(30), [56, 30]),  # comma 20 back: the 19 after it move on
    (a_run(54) + ", " + a_run(30), [75, 10]),  # 21 back: no backtrack
    (a_run(74) + ", " + a_run(5), [75, 5]),  # comma last in the chunk: nothing moves
    (a_run(75) + ", " + a_run(5), [75, 6]),  # comma first in the next chunk
    ("a BREAK a", [1, 1]),
    ("BREAK a", [0, 1]),  # A1111: a leading BREAK leaves an empty first chunk
    ("a BREAK", [1]),  # ... a trailing one adds nothing
    ("BREAK", [0]),
    (a_run(75) + "BREAK a", [75, 1]),  # BREAK after a full chunk adds no empty one
    (a_run(70) + ", a BREAK " + a_run(80), [72, 75, 5]),  # BREAK forgets the last comma
])
def test_chunking(tok, text, expected):
    p = encode_prompt(tok, text, max_chunks=8)
    assert lengths(p) == expected
    assert (p.ids[:, 0] == BOS).all() and (p.ids[:, 76] == EOS).all()


def test_backtrack_moves_weights_with_tokens(tok):
    p = encode_prompt(tok, a_run(55) + ", (" + a_run(19) + ") b", 2)
    assert lengths(p) == [56, 20]
    assert (p.weights[0] == 1).all()
    np.testing.assert_array_equal(p.weights[1, 1:22], np.float32([1.1] * 19 + [1, 1]))


def test_max_chunks_counts_dropped_tokens(tok):
    assert encode_prompt(tok, a_run(200), 3).dropped == 0
    two = encode_prompt(tok, a_run(200), 2)
    assert two.ids.shape == (2, 77) and two.dropped == 50
    one = encode_prompt(tok, a_run(200), 1)
    np.testing.assert_array_equal(one.ids, two.ids[:1])
    assert one.dropped == 125
    assert encode_prompt(tok, "a BREAK BREAK", 1).dropped == 0  # empty chunks drop nothing
    with pytest.raises(ValueError, match="max_chunks"):
        encode_prompt(tok, "a", 0)
    with pytest.raises(ValueError, match=r"weight of inf is outside \[-10000, 10000\]"):
        encode_prompt(tok, "(a:" + "9" * 400 + ")", 1)
    with pytest.raises(ValueError, match="weight of 1e\\+40"):  # finite, but not in float32
        encode_prompt(tok, "(a:" + "9" * 40 + ")", 1)


def a1111_tokenize_line(hf, line: str) -> list[tuple[list[int], list[float]]]:
    """A1111's tokenize_line (emphasis "Original", comma_padding_backtrack 20, no textual
    inversion) over transformers' tokenizer: [(77 ids, 77 multipliers)] per chunk."""
    parsed = parse_prompt_attention(line)
    tokenized = hf([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    comma_token = hf.convert_tokens_to_ids(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def next_chunk():
        nonlocal tokens, mults, last_comma
        pad = 75 - len(tokens)
        chunks.append(([hf.bos_token_id, *tokens, *[hf.eos_token_id] * pad, hf.eos_token_id],
                       [1.0, *mults, *[1.0] * pad, 1.0]))
        tokens, mults, last_comma = [], [], -1

    for ids, (text, weight) in zip(tokenized, parsed, strict=True):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in ids:
            if token == comma_token:
                last_comma = len(tokens)
            elif len(tokens) == 75 and last_comma != -1 and len(tokens) - last_comma <= 20:
                reloc = tokens[last_comma + 1:], mults[last_comma + 1:]
                tokens, mults = tokens[:last_comma + 1], mults[:last_comma + 1]
                next_chunk()
                tokens, mults = list(reloc[0]), list(reloc[1])
            if len(tokens) == 75:
                next_chunk()
            tokens.append(token)
            mults.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


WORDS = ["a", "red", "cat", "masterpiece", "best quality", "highly detailed", "8k", "3.5",
         "東京", "🚀", "don't", "<|endoftext|>", "sunset,", ",", ", ", "(", ")", "[", "]",
         ":1.3)", ":0.5)", "\\(", " BREAK ", "scenery", "oil-painting"]


def random_prompt(rng: random.Random) -> str:
    n = rng.choice([0, 5, 40, 70, 80, 120, 200, 300])
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_chunks_equal_a1111_over_transformers(tok, hf):
    rng = random.Random(0)
    prompts = [
        a_run(55) + ", " + a_run(30), a_run(54) + ", " + a_run(30), a_run(75) + ", " + a_run(5),
        "masterpiece, " * 60, "(best quality:1.2), " * 30 + "BREAK " + "a cat, " * 50,
        "BREAK a", "a BREAK", "(a BREAK b)", "", a_run(70) + ", a BREAK " + a_run(80),
        *(random_prompt(rng) for _ in range(200)),
    ]
    assert max(len(a1111_tokenize_line(hf, p)) for p in prompts) >= 4  # some prompts are long
    for text in prompts:
        ref = a1111_tokenize_line(hf, text)
        p = encode_prompt(tok, text, max_chunks=len(ref))
        assert p.dropped == 0, text
        np.testing.assert_array_equal(p.ids, [ids for ids, _ in ref], err_msg=text)
        np.testing.assert_array_equal(p.weights, np.float32([m for _, m in ref]), err_msg=text)


# --- pad_chunks ---------------------------------------------------------------------------

def test_pad_chunks_appends_the_empty_prompt(tok):
    empty = encode_prompt(tok, "", 1)
    long, short = encode_prompt(tok, "(a:1.3) " * 100, 4), encode_prompt(tok, "[b]", 4)
    ids, weights = pad_chunks([long, short], empty)
    assert ids.shape == weights.shape == (2, 2, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0], long.ids)
    np.testing.assert_array_equal(weights[0], long.weights)
    np.testing.assert_array_equal(ids[1], [short.ids[0], empty.ids[0]])
    np.testing.assert_array_equal(weights[1], [short.weights[0], np.ones(77)])
    np.testing.assert_array_equal(empty.ids[0], [BOS] + [EOS] * 76)  # A1111's empty_chunk()
    alone_ids, _ = pad_chunks([short], empty)
    np.testing.assert_array_equal(alone_ids[0], short.ids)
    with pytest.raises(ValueError):
        pad_chunks([], empty)
    with pytest.raises(ValueError):
        pad_chunks([short], long)


# --- emphasize ----------------------------------------------------------------------------

def a1111_emphasis(torch, z, multipliers):
    """EmphasisOriginal.after_transformers: z [B, 77, C], multipliers [B, 77]."""
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def test_unit_weights_return_the_input_bit_for_bit():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 2, 77, 16), dtype=np.float32)
    z[1, 0] -= z[1, 0].mean()  # a zero mean must not turn into nan either
    out = emphasize(z, np.ones((3, 2, 77), np.float32))
    assert out.dtype == np.float32 and np.array_equal(out, z)
    w = np.ones((3, 2, 77), np.float32)
    w[0, 1, 5] = 1.3  # emphasis in one chunk of one prompt leaves the others alone
    out = emphasize(z, w)
    assert np.array_equal(np.delete(out.reshape(6, 77, 16), 1, 0), np.delete(z.reshape(6, 77, 16), 1, 0))
    assert not np.array_equal(out[0, 1], z[0, 1])


def test_emphasis_equals_a1111_in_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for _ in range(5):
        z = rng.standard_normal((77, 768), dtype=np.float32) + rng.uniform(-1, 1)
        w = rng.choice(np.float32([1, 1, 1.1, 1.21, 1 / 1.1, 0.5, 1.5]), 77)
        ref = a1111_emphasis(torch, torch.from_numpy(z)[None], torch.from_numpy(w)[None])[0].numpy()
        np.testing.assert_allclose(emphasize(z, w), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        emphasize(np.zeros((77, 8), np.float32), np.ones(76, np.float32))


def test_long_weighted_prompts_through_the_demo_text_encoder(tok, hf, demo_components):
    """A1111's whole procedure in torch (tokenize_line, one text-encoder call per chunk,
    emphasis, hstack, then pad_cond_uncond with the empty prompt's encoding) against ours,
    with the same torch text encoder standing in for the runtime's engine."""
    import copy

    torch = pytest.importorskip("torch")
    te = copy.deepcopy(demo_components.text_encoder).eval()
    # The demo's final LayerNorm has bias 0, so every chunk's mean is ~1e-8 and A1111's
    # mean ratio is round-off over round-off; real CLIP's bias keeps it away from 0.
    with torch.no_grad():
        bias = torch.randn(te.config.hidden_size, generator=torch.Generator().manual_seed(0))
        te.final_layer_norm.bias.copy_(bias)

    def a1111_forward(text):  # FrozenCLIPEmbedderWithCustomWords.forward([text]): [1, 77k, C]
        zs = []
        for ids, mults in a1111_tokenize_line(hf, text):
            with torch.no_grad():
                z = te(input_ids=torch.tensor([ids])).last_hidden_state  # [1, 77, C]
            zs.append(a1111_emphasis(torch, z, torch.asarray([mults])))
        return torch.hstack(zs)

    prompt = "a ((house:1.3)) [on] a (hill:0.5), sun, (((sky))), " * 12 + "BREAK (red:1.4) sky"
    negative = "[blurry], (worst quality:1.4)"
    cond, uncond = a1111_forward(prompt), a1111_forward(negative)
    empty = a1111_forward("")  # pad_cond_uncond: cond_stage_model_empty_prompt
    uncond = torch.cat([uncond, empty.repeat(1, cond.shape[1] // 77 - 1, 1)], dim=1)
    ref = torch.cat([cond, uncond]).numpy()  # [2, 77k, C]

    ids, weights = pad_chunks([encode_prompt(tok, t, 8) for t in (prompt, negative)],
                              encode_prompt(tok, "", 1))  # [2, k, 77]
    p, k = ids.shape[:2]
    assert k >= 3
    with torch.no_grad():
        hidden = np.stack([te(input_ids=torch.from_numpy(ids[:, j]).long()).last_hidden_state.numpy()
                           for j in range(k)], axis=1)  # [2, k, 77, C]
    ours = emphasize(hidden, weights).reshape(p, k * 77, -1)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

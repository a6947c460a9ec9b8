"""Long and weighted prompts through the whole pipeline, prompt_embeds, format 1.0
bundles, and the VAE encoder loaded on first use.

The reference for a long weighted prompt is AUTOMATIC1111's procedure in torch
(tests/test_prompts.py: tokenize_line over transformers' tokenizer, one text-encoder call
per chunk, "Original" emphasis, chunks side by side, the negative prompt padded with the
empty prompt's encoding) handed to diffusers' StableDiffusionPipeline as prompt_embeds /
negative_prompt_embeds: so the UNet's dynamic text axis, the chunk loop and the
emphasis are checked together, image against image, within 2/255.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from runtime.bundle import MANIFEST, BundleError, demo_bundle  # noqa: E402
from runtime.pipeline import Pipeline, UsageError  # noqa: E402
from tests.test_pipeline_parity import PROMPT, compare, reference  # noqa: E402
from tests.test_prompts import a1111_emphasis, a1111_tokenize_line  # noqa: E402

LONG = "a ((house:1.3)) [on] a (hill:0.5), sun, (((sky))), " * 16 + "BREAK (red:1.4) sky"
NEGATIVE = "[blurry], (worst quality:1.4)"


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """The demo model with a random final-LayerNorm bias: the demo's is 0, which puts
    every chunk's mean at ~1e-8 and makes A1111's mean restore round-off over round-off
    (real CLIP's bias keeps it away from 0)."""
    from export.bundle_writer import export_bundle
    from export.components import build_components

    c = build_components("demo", seed=0)
    with torch.no_grad():
        te = c.text_encoder
        te.final_layer_norm.bias.copy_(torch.randn(te.config.hidden_size,
                                                   generator=torch.Generator().manual_seed(0)))
    bundle = export_bundle(c, tmp_path_factory.mktemp("biased") / "bundle", safety=False,
                           log=lambda msg: None)
    return c, bundle


def a1111_embeds(c, bundle, text: str) -> torch.Tensor:
    """FrozenCLIPEmbedderWithCustomWords.forward([text]): [1, 77k, C]."""
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer(str(bundle / "tokenizer" / "vocab.json"),
                       str(bundle / "tokenizer" / "merges.txt"))
    zs = []
    for ids, mults in a1111_tokenize_line(hf, text):
        with torch.no_grad():
            z = c.text_encoder(input_ids=torch.tensor([ids])).last_hidden_state  # [1, 77, C]
        zs.append(a1111_emphasis(torch, z, torch.asarray([mults])))
    return torch.hstack(zs)


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_a_long_weighted_prompt_matches_a1111_embeddings_in_diffusers(biased, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    c, bundle = biased
    cond = a1111_embeds(c, bundle, LONG)
    uncond = a1111_embeds(c, bundle, NEGATIVE)
    k = cond.shape[1] // 77
    assert k == 4  # 16 x 13 tokens, chunks cut at commas, + BREAK: four chunks, 308 tokens
    uncond = torch.cat([uncond, a1111_embeds(c, bundle, "").repeat(1, k - 1, 1)], dim=1)
    pipe = reference(c, bundle, "euler_a", safety=False)
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=6,
               guidance_scale=7.5, generator=torch.Generator().manual_seed(2), output_type="np")
    ref = (ref.images * 255).round().astype(np.uint8)
    with Pipeline(bundle, backend, precision="fp32") as ours:
        got = ours(LONG, NEGATIVE, steps=6, scheduler="euler_a", seed=2)
        assert got.request.text_tokens == 4 * 77 and got.dropped_tokens == [0]
        compare(got.images, ref)
        # the same embeddings given directly, as diffusers takes them
        direct = ours(prompt_embeds=cond.numpy(), negative_prompt_embeds=uncond.numpy(),
                      steps=6, scheduler="euler_a", seed=2)
        compare(direct.images, ref)


def test_prompt_embeds_without_negative_embeds_pad_the_empty_prompt(biased):
    """diffusers encodes "" for the negative side; at 77 tokens that is our empty chunk."""
    c, bundle = biased
    cond = a1111_embeds(c, bundle, PROMPT)  # a plain prompt: diffusers' own encoding
    pipe = reference(c, bundle, "ddim", safety=False)
    ref = pipe(prompt_embeds=cond, num_inference_steps=5, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(3), output_type="np")
    with Pipeline(bundle, "ort-cpu") as ours:
        got = ours(prompt_embeds=cond.numpy(), steps=5, scheduler="ddim", seed=3)
        plain = ours(PROMPT, steps=5, scheduler="ddim", seed=3)
        with pytest.raises(UsageError, match="not both"):
            ours.request(PROMPT, prompt_embeds=cond.numpy())
        with pytest.raises(UsageError, match="prompt_embeds must be a float array"):
            ours.request(prompt_embeds=np.zeros((1, 77, 5), np.float32))
        with pytest.raises(UsageError, match="negative_prompt_embeds must be"):
            ours.request(prompt_embeds=cond.numpy(),
                         negative_prompt_embeds=np.zeros((1, 154, c.hidden), np.float32))
    compare(got.images, (ref.images * 255).round().astype(np.uint8))
    compare(got.images, plain.images)  # torch's encoding vs the text encoder engine's


def test_a_text_prompt_with_negative_prompt_embeds_as_diffusers_takes_them(biased):
    """diffusers encodes the prompt and takes the negative side as given: so do we, its
    shape the prompt's own ([P, 77k, C]); a negative prompt beside them is refused."""
    c, bundle = biased
    uncond = a1111_embeds(c, bundle, NEGATIVE)  # [1, 77, C]
    pipe = reference(c, bundle, "euler", safety=False)
    ref = pipe(PROMPT, negative_prompt_embeds=uncond, num_inference_steps=5, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(4), output_type="np")
    with Pipeline(bundle, "ort-cpu") as ours:
        got = ours(PROMPT, negative_prompt_embeds=uncond.numpy(), steps=5, scheduler="euler",
                   seed=4)
        with pytest.raises(UsageError, match="not both"):
            ours.request(PROMPT, NEGATIVE, negative_prompt_embeds=uncond.numpy())
        with pytest.raises(UsageError, match="not both"):  # beside both embeds too (diffusers)
            ours.request(None, NEGATIVE, prompt_embeds=uncond.numpy(),
                         negative_prompt_embeds=uncond.numpy())
        with pytest.raises(UsageError, match=r"negative_prompt_embeds \(the prompt's 1 chunk\(s\) "
                                             r"of 77 tokens\) must be a float array of shape \[1, 77, "):
            ours.request(PROMPT, negative_prompt_embeds=np.zeros((1, 154, c.hidden), np.float32))
    compare(got.images, (ref.images * 255).round().astype(np.uint8))


def as_format_1_0(bundle):
    """The manifest a 1.0 export wrote: the UNet's text axis fixed at 77, no VAE
    encoder, no minor version, no tokens in the profile (its graphs are unchanged)."""
    m = json.loads((bundle / MANIFEST).read_text())
    m.pop("format_minor")
    m["profile"].pop("tokens")
    m["graphs"].pop("vae_encoder")
    unet = m["graphs"]["unet"]
    unet["inputs"][2]["shape"][1] = 77
    (bundle / MANIFEST).write_text(json.dumps(m))
    (bundle / "vae_encoder.onnx").unlink()


def test_a_format_1_0_bundle_still_runs_text_to_image(tmp_path):
    bundle = tmp_path / "old"
    shutil.copytree(demo_bundle(), bundle)
    as_format_1_0(bundle)
    with Pipeline(demo_bundle(), "ort-cpu") as new, Pipeline(bundle, "ort-cpu") as old:
        assert old.manifest.format_minor == 0 and old.manifest.max_text_tokens == 77
        a = new(PROMPT, steps=3, seed=1).images
        assert np.array_equal(old(PROMPT, steps=3, seed=1).images, a)  # bit for bit
        long = old("word " * 100, steps=1, seed=1)  # one chunk: the rest is dropped, said
        assert long.request.text_tokens == 77 and long.dropped_tokens == [25]
        # cut as diffusers truncates (the first 75 tokens), not at a comma as chunks are
        text = "word " * 60 + ", " + "cat " * 30
        ids, _ = old.tokenizer.encode([text])  # [1, 77]: diffusers' truncation
        assert np.array_equal(old.request(text).text_ids[0, 0], ids[0])
        assert old.request("a red apple BREAK on a table").dropped == (0, 0)  # a separator here
    # engines.build on it: --max-tokens 77 is what it is; more needs a re-export
    from engines.build import UsageError as BuildError
    from engines.build import choose_profiles

    m = old.manifest
    assert choose_profiles(m, False, None, None, None, (None, None, None, 77))[0].tokens[2] == 77
    with pytest.raises(BuildError, match="re-export it for long prompts"):
        choose_profiles(m, False, None, None, None, (None, None, None, 154))
        with pytest.raises(UsageError, match=r"no VAE encoder \(format 1.0\).*re-export"):
            old.request(PROMPT, image=np.zeros((64, 64, 3), np.uint8))
        with pytest.raises(UsageError, match="takes exactly 77 tokens"):
            old.request(prompt_embeds=np.zeros((1, 154, old.manifest.hidden), np.float32))


def test_a_request_made_by_another_pipeline_runs(tmp_path):
    """run() loads the VAE encoder itself for an img2img Request from elsewhere."""
    image = np.full((64, 64, 3), 90, np.uint8)
    with Pipeline(demo_bundle(), "ort-cpu") as a, Pipeline(demo_bundle(), "ort-cpu") as b:
        req = a.request(PROMPT, image=image, strength=0.5, steps=4, seed=2)
        assert "vae_encoder" not in b.engines
        assert np.array_equal(b.run(req).images, a.run(req).images)
        with pytest.raises(UsageError, match="values are 0 and 1"):
            a.request(PROMPT, image=image, mask=np.ones((64, 64), np.uint8))


def test_the_vae_encoder_loads_on_first_use_and_is_checked(tmp_path, monkeypatch):
    """Text-to-image never loads it; the first img2img request does, after checking its
    file like every graph (a damaged one: BundleError, and text-to-image still runs)."""
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle(), bundle)
    image = np.full((64, 64, 3), 120, np.uint8)
    lines: list[str] = []
    with Pipeline(bundle, "ort-cpu", log=lines.append) as pipe:
        assert "vae_encoder" not in pipe.engines and "vae_encoder" not in pipe.load_report.graphs
        pipe(PROMPT, steps=2, seed=1)
        assert "vae_encoder" not in pipe.engines
        pipe(PROMPT, image=image, steps=4, seed=1)
        assert "vae_encoder" in pipe.engines and "vae_encoder" in pipe.load_report.graphs
        assert any(x.startswith("vae_encoder: loaded in") for x in lines)
    data = bytearray((bundle / "vae_encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x55
    (bundle / "vae_encoder.onnx").write_bytes(bytes(data))
    with Pipeline(bundle, "ort-cpu") as pipe:
        with pytest.raises(BundleError, match="vae_encoder.onnx does not match its hash"):
            pipe(PROMPT, image=image, steps=4, seed=1)
        assert "vae_encoder" not in pipe.engines and "vae_encoder" not in pipe.load_report.graphs
        assert pipe(PROMPT, steps=2, seed=1).images.shape == (1, 64, 64, 3)

"""The baseline: diffusers' StableDiffusionPipeline on the bundle's own weights.

Weights come from where the bundle says it was exported from (`manifest.source`),
through the export stage's own loader: a built-in model (demo, sd14-random) is rebuilt
with its deterministic builder (seed: source.seed, else 0), a diffusers folder is
loaded. The weights are hashed as export hashes them and checked against the
manifest's source hash. Tokenizer files and scheduler config are the bundle's, so
both sides tokenize and schedule from the same files.

Stage times come from forward hooks and diffusers' `callback_on_step_end` (public
APIs; nothing is patched): marks are host clock readings on the CPU and CUDA events
on a GPU (the GPU path is UNTESTED here: no GPU in the session that wrote it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import MAX_TOKENS, SCHEDULER_CONFIG, TOKENIZER_DIR, Manifest
from runtime.images import postprocess
from runtime.schedulers import CONFIG_OVERRIDES, DIFFUSERS_CLASS


def load_pipeline(bundle: Path, manifest: Manifest, scheduler: str, device: str, dtype: str,
                  safety: bool, compile_unet: bool) -> tuple[Any, dict]:
    """(StableDiffusionPipeline, where its weights came from and whether they hash to the
    manifest's source hash)."""
    import diffusers
    import torch
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from export.components import weights_sha256
    from export.sources import load_components  # the export stage's own loader

    source = manifest.source
    has_checker = "safety_checker" in manifest.graphs
    seed = int(source.get("seed", 0))
    parts = load_components(source["model"], safety=has_checker, seed=seed)
    t = time.perf_counter()
    digest = weights_sha256(parts)  # same weights as the bundle? (timed: not part of loading)
    where = {"source": source["model"], "seed": seed, "hash_matches_manifest": digest == source.get("hash"),
             "hash_seconds": time.perf_counter() - t}
    tokenizer = CLIPTokenizer.from_pretrained(str(bundle / TOKENIZER_DIR), model_max_length=MAX_TOKENS)
    config = json.loads((bundle / SCHEDULER_CONFIG).read_text())
    sched = getattr(diffusers, DIFFUSERS_CLASS[scheduler]).from_config(
        {**config, **CONFIG_OVERRIDES[scheduler]})
    checker = parts.safety_checker if safety and has_checker else None
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=tokenizer, unet=parts.unet,
        scheduler=sched, safety_checker=checker,
        # v1-4's feature_extractor config is CLIPImageProcessor's defaults
        feature_extractor=CLIPImageProcessor() if checker is not None else None,
        requires_safety_checker=False)
    pipe = pipe.to(device, getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda":  # fp16 + PyTorch SDPA, as diffusers recommends (UNTESTED here)
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if compile_unet:  # UNTESTED here
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    return pipe, where


class Clock:
    """Named marks: perf_counter on the CPU, CUDA events on a GPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def resolve(self) -> list[tuple[str, float]]:
        """(name, seconds since the first mark)."""
        if not self.marks:
            return []
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            first = self.marks[0][1]
            return [(n, first.elapsed_time(e) / 1e3) for n, e in self.marks]
        t0 = self.marks[0][1]
        return [(n, t - t0) for n, t in self.marks]


class Instrumented:
    """A baseline pipeline with hooks; `generate(batch)` returns what the worker needs."""

    def __init__(self, pipe: Any, device: str):
        self.pipe, self.device = pipe, device
        self.clock = Clock(device == "cuda")
        self.decoded: np.ndarray | None = None
        mark = self.clock.mark
        pipe.text_encoder.register_forward_pre_hook(lambda m, a: mark("te_pre"))
        pipe.text_encoder.register_forward_hook(lambda m, a, o: mark("te_post"))
        pipe.unet.register_forward_pre_hook(lambda m, a: mark("unet_pre"))
        pipe.unet.register_forward_hook(lambda m, a, o: mark("unet_post"))
        vae = pipe.vae
        first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
        first.register_forward_pre_hook(lambda m, a: mark("vae_pre"))
        vae.decoder.register_forward_hook(self._decoder_done)
        if pipe.safety_checker is not None:
            pipe.safety_checker.register_forward_hook(lambda m, a, o: mark("safety_post"))

    def _decoder_done(self, module: Any, args: Any, out: Any) -> None:
        self.clock.mark("vae_post")
        self.decoded = out.detach().float().cpu().numpy()  # [B, 3, H, W] in [-1, 1]

    def _step(self, pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        self.clock.mark("step")
        if self.on_step is not None:
            self.on_step(i + 1, pipe.num_timesteps)
        return kwargs

    def generate(self, prompt: str, negative: str, kw: dict, on_step: Any = None) -> dict:
        import torch

        self.on_step = on_step
        self.clock.marks = []
        generator = torch.Generator("cpu").manual_seed(kw["seed"])
        t0 = time.perf_counter()
        self.clock.mark("start")
        out = self.pipe(prompt, negative_prompt=negative or None, num_inference_steps=kw["steps"],
                        guidance_scale=kw["guidance_scale"], height=kw["height"], width=kw["width"],
                        num_images_per_prompt=kw["batch_size"], generator=generator,
                        output_type="np", callback_on_step_end=self._step)
        if self.device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        marks = self.clock.resolve()
        nsfw = out.nsfw_content_detected
        return {"marks": marks, "total": total, "images": postprocess(self.decoded),
                "nsfw": [bool(x) for x in nsfw] if nsfw is not None else [False] * kw["batch_size"]}


def stage_times(marks: list[tuple[str, float]], total: float, safety: bool) -> dict:
    """Our stage names from one call's marks; see the module docstring."""
    def at(name: str) -> list[float]:
        return [t for n, t in marks if n == name]

    te = sum(b - a for a, b in zip(at("te_pre"), at("te_post"), strict=True))
    calls = [b - a for a, b in zip(at("unet_pre"), at("unet_post"), strict=True)]
    vae_pre, vae_post = at("vae_pre")[0], at("vae_post")[0]
    out = {"text_encoder": te, "denoise": vae_pre - at("te_post")[-1], "unet": sum(calls),
           "vae_decoder": vae_post - vae_pre, "total": total}
    if safety and at("safety_post"):
        out["safety_checker"] = at("safety_post")[0] - vae_post
    return {"timings": out, "unet_calls": calls, "step_ends": at("step")}

"""Per-graph torch wrappers, their sample inputs, torch.onnx.export, and the ORT check.

Each wrapper's forward takes and returns exactly the tensors of its runtime.bundle
GraphSpec, in order, so the graph's I/O names, dtypes and dynamic axes all come from
the spec (`graph_spec(...).dynamic_axes()`); nothing about a graph is restated here.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

from export.components import Components
from runtime.bundle import (
    LATENT_CHANNELS,
    MAX_TOKENS,
    SAFETY_CONCEPTS,
    SAFETY_SIZE,
    VAE_FACTOR,
    GraphSpec,
    graph_spec,
)

CHECK_LATENT = 32  # latent side of the sample inputs at most (256 px), so full-size checks stay quick


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):  # [B, 77] int32
        return self.text_encoder(input_ids=input_ids.to(torch.int64)).last_hidden_state  # [B, 77, C]


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):  # [N, U, h, w], [1], [N, T, C]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]  # [N, 4, h, w]


class VaeDecoder(torch.nn.Module):
    """latent already divided by the scaling factor on the host -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):  # [B, 4, h, w]
        return self.vae.decode(latent, return_dict=False)[0]  # [B, 3, 8h, 8w]


class VaeEncoder(torch.nn.Module):
    """image in [-1, 1] -> the posterior's parameters (mean and log-variance stacked, as
    diffusers' DiagonalGaussianDistribution takes them); the host clamps the log-variance
    and draws the sample from the seed's stream, where diffusers' latent_dist.sample does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):  # [B, 3, H, W]
        return self.vae.encode(image, return_dict=False)[0].parameters  # [B, 8, H/8, W/8]


class SafetyChecker(torch.nn.Module):
    """StableDiffusionSafetyChecker.forward_onnx without its in-place blackout of the
    images (the host blacks out flagged images). Returns its flags and the two score
    matrices (cosine minus threshold, before any adjustment) from which the host applies
    `forward`'s rule, which rounds each score to 3 decimals first (runtime/safety.py):
    what diffusers' StableDiffusionPipeline calls."""

    def __init__(self, checker):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input):  # [B, 3, 224, 224]
        c = self.checker
        pooled = c.vision_model(clip_input)[1]  # [B, vision hidden]
        image_embeds = c.visual_projection(pooled)  # [B, P]
        special_cos = cosine_distance(image_embeds, c.special_care_embeds)  # [B, 3]
        cos = cosine_distance(image_embeds, c.concept_embeds)  # [B, 17]
        special_care = torch.any(special_cos - c.special_care_embeds_weights > 0, dim=1)  # [B]
        adjustment = (special_care * 0.01).unsqueeze(1).expand(-1, cos.shape[1])  # [B, 17]
        base = cos - c.concept_embeds_weights  # [B, 17]
        special = special_cos - c.special_care_embeds_weights  # [B, 3]
        return torch.any(base + adjustment > 0, dim=1), base, special  # [B] bool


@dataclass(frozen=True)
class GraphJob:
    """One graph to export: its spec, torch wrapper and sample inputs (spec order)."""

    spec: GraphSpec
    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]


def sample_inputs(name: str, c: Components, batch: int = 1, latent: tuple[int, int] | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs for graph `name`; `latent` (h, w) defaults to the export shape.

    The UNet's default latent side is odd (CHECK_LATENT + 1), i.e. not a multiple of its
    total downsampling, so diffusers' UNet passes explicit upsample sizes and the traced
    graph computes them from the input shape: it then runs at any h, w, not only at
    multiples of 2 ** (number of down blocks - 1).
    """
    g = torch.Generator().manual_seed(seed)
    side = min(c.unet.config.sample_size, CHECK_LATENT)
    if name == "text_encoder":
        vocab = c.text_encoder.config.vocab_size
        ids = torch.randint(0, vocab - 2, (batch, MAX_TOKENS), generator=g, dtype=torch.int32)
        ids[:, 0] = vocab - 2  # <|startoftext|>
        ids[:, 9:] = vocab - 1  # <|endoftext|> and padding, as the tokenizer gives
        return (ids,)  # [B, 77] int32
    if name == "unet":
        h, w = latent or (side + 1, side + 1)
        n = 2 * batch  # classifier-free guidance batch
        # two prompt chunks: the text axis T is dynamic (long prompts), so trace off 77
        return (torch.randn(n, c.unet.config.in_channels, h, w, generator=g),  # [N, U, h, w]
                torch.tensor([981.0]),  # [1] float32
                torch.randn(n, 2 * MAX_TOKENS, c.hidden, generator=g))  # [N, T, C]
    if name == "vae_decoder":
        h, w = latent or (side, side)
        return (torch.randn(batch, LATENT_CHANNELS, h, w, generator=g)
                / float(c.vae.config.scaling_factor),)  # [B, 4, h, w], as the host scales it
    if name == "vae_encoder":
        h, w = latent or (side, side)
        return (torch.rand(batch, 3, h * VAE_FACTOR, w * VAE_FACTOR, generator=g) * 2 - 1,)  # [B, 3, H, W]
    if name == "safety_checker":
        return (torch.rand(batch, 3, SAFETY_SIZE, SAFETY_SIZE, generator=g) * 4 - 2,)  # [B, 3, 224, 224]
    raise KeyError(name)


def graph_jobs(c: Components, safety: bool = True) -> list[GraphJob]:
    """The graphs of a bundle in runtime.bundle.GRAPH_ORDER."""
    concepts = c.safety_checker.concept_embeds.shape[0] if c.safety_checker is not None else SAFETY_CONCEPTS
    wrappers = {"text_encoder": lambda: TextEncoder(c.text_encoder), "unet": lambda: UNet(c.unet),
                "vae_decoder": lambda: VaeDecoder(c.vae), "vae_encoder": lambda: VaeEncoder(c.vae)}
    if safety and c.safety_checker is not None:
        wrappers["safety_checker"] = lambda: SafetyChecker(c.safety_checker)
    return [GraphJob(graph_spec(name, c.hidden, concepts, c.unet.config.in_channels),
                     make().eval(), sample_inputs(name, c))
            for name, make in wrappers.items()]


def export_onnx(job: GraphJob, path: Path, opset: int) -> None:
    """torch.onnx.export (TorchScript exporter) with the spec's names and dynamic axes.

    Graphs over 2 GB come out with one file per weight beside `path`; bundle_writer
    gathers them into one `.onnx.data` file.
    """
    spec = job.spec
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings flag Python branches on shapes; the tests run every graph at other shapes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deliberate
        torch.onnx.export(
            job.module, job.inputs, str(path), dynamo=False, opset_version=opset,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)


def torch_outputs(job: GraphJob, inputs: tuple[torch.Tensor, ...] | None = None) -> list[np.ndarray]:
    with torch.no_grad():
        out = job.module(*(inputs if inputs is not None else job.inputs))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def ort_session(path: Path) -> ort.InferenceSession:
    """A plain CPU session on the graph as written (no ORT graph rewrites, less memory)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_abs_error(session: ort.InferenceSession, job: GraphJob,
                  inputs: tuple[torch.Tensor, ...] | None = None) -> float:
    """Largest |ORT - torch| over all outputs (a flipped bool counts as 1.0)."""
    inputs = inputs if inputs is not None else job.inputs
    feed = {t.name: x.numpy() for t, x in zip(job.spec.inputs, inputs, strict=True)}
    got = session.run([t.name for t in job.spec.outputs], feed)
    want = torch_outputs(job, inputs)
    err = 0.0
    for t, a, b in zip(job.spec.outputs, got, want, strict=True):
        if a.shape != b.shape or str(a.dtype) != t.dtype:
            raise RuntimeError(f"{job.spec.name}: output {t.name} is {a.dtype}{list(a.shape)} in ONNX "
                               f"Runtime, expected {t.dtype}{list(b.shape)}")
        err = max(err, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)))
    return err


def check_io(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """The exported graph's input/output names and element types are the spec's."""
    elem = {"float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32,
            "bool": onnx.TensorProto.BOOL}
    for kind, got, want in (("inputs", model.graph.input, spec.inputs),
                            ("outputs", model.graph.output, spec.outputs)):
        have = [(v.name, v.type.tensor_type.elem_type) for v in got]
        need = [(t.name, elem[t.dtype]) for t in want]
        if have != need:
            raise RuntimeError(f"{spec.name}: exported {kind} {have} differ from the spec's {need}")


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t

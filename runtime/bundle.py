"""The bundle contract: one spec per graph, and the manifest reader/writer.

Imported by export, engines and runtime alike, so it must never import torch.
Each fact about a graph (tensor names, dtypes, named axes, shape profiles) is
written here once.

Named axes:  B   images per call (batch of the text encoder, VAE, safety checker)
             N   UNet batch: 2B with classifier-free guidance, B without
             h,w latent height/width (H/8, W/8);  H,W image height/width
             T   text tokens the UNet attends to: 77 per prompt chunk (77k; long prompts)

Model facts filled in per bundle: C text hidden width (768 for v1.x), K safety concepts,
U UNet input channels (4; 9 for inpainting UNets: latents, mask, masked-image latents).

Format 1.1 (`format_minor` 1) added the VAE encoder (img2img, inpainting) and the T axis;
1.0 bundles still load: their UNet takes exactly 77 tokens and they have no encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.args import first_line
from runtime.files import read_small, write_atomic

FORMAT_VERSION = 1
FORMAT_MINOR = 1  # 1.1: vae_encoder graph, the UNet's text axis T, unet_channels U
MANIFEST = "manifest.json"
SCHEDULER_CONFIG = "scheduler_config.json"
TOKENIZER_DIR = "tokenizer"

MAX_TOKENS = 77  # CLIP's context length
LATENT_CHANNELS = 4
INPAINT_CHANNELS = 9  # sd-v1-5-inpainting's UNet: latents 4 + mask 1 + masked-image latents 4
VAE_FACTOR = 8  # pixels per latent cell
SAFETY_SIZE = 224  # CLIP ViT-L/14 image size
TOKEN_TABLE = "embeddings.token_embedding.weight"  # the text encoder's, in the weight map
VAE_SCALING_FACTOR = 0.18215  # v1.x; the host divides latents by it before the decoder
MAX_JSON_BYTES = 1 << 20  # manifest.json, scheduler_config.json: a few KB in practice
MAX_SIDE = 8192  # px: a sanity bound on image sides (profiles, and any size a backend runs)
MAX_BATCH = 64  # images per call, likewise
MAX_DIM = 1 << 16  # any fixed tensor axis or hidden width in a manifest (v1.x: 768 at most)
DTYPES = ("float32", "float16", "int32", "int64", "bool")  # numpy names a manifest may use
AXES = ("B", "N", "h", "w", "H", "W", "T")  # the named axes (module doc)
SAFETY_CONCEPTS = 17  # StableDiffusionSafetyChecker: 17 concept (+ 3 special-care) embeddings
SAFETY_SPECIAL = 3
BOS = "<|startoftext|>"  # CLIP tokenizer's begin token, id 49406
EOS = "<|endoftext|>"  # its end token, id 49407; also the pad and unknown token of v1.x


class BundleError(Exception):
    """A bundle is missing, corrupt or of the wrong format; the message says what to do."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int32, bool
    shape: tuple[str | int, ...]  # ints are fixed; strings are named axes (see module doc)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(d: dict) -> TensorSpec:
        return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Concrete output shapes implied by concrete input shapes (H = 8h, W = 8w)."""
        axes: dict[str, int] = {}
        for t in self.inputs:
            for a, v in zip(t.shape, input_shapes[t.name], strict=True):
                if isinstance(a, str):
                    axes[a] = v
        for small, big in (("h", "H"), ("w", "W")):
            if small in axes:
                axes.setdefault(big, axes[small] * VAE_FACTOR)
            elif big in axes:
                axes[small] = axes[big] // VAE_FACTOR
        return {t.name: tuple(axes[a] if isinstance(a, str) else a for a in t.shape)
                for t in self.outputs}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's `dynamic_axes` for this graph."""
        return {
            t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(a, str) for a in t.shape)
        }


def _graphs(hidden: str = "C") -> dict[str, GraphSpec]:
    T, L = TensorSpec, LATENT_CHANNELS
    return {
        "text_encoder": GraphSpec(
            "text_encoder",
            (T("input_ids", "int32", ("B", MAX_TOKENS)),),
            (T("last_hidden_state", "float32", ("B", MAX_TOKENS, hidden)),),
        ),
        "unet": GraphSpec(
            "unet",
            (
                T("sample", "float32", ("N", "U", "h", "w")),
                T("timestep", "float32", (1,)),
                T("encoder_hidden_states", "float32", ("N", "T", hidden)),
            ),
            (T("noise_pred", "float32", ("N", L, "h", "w")),),
        ),
        "vae_decoder": GraphSpec(
            "vae_decoder",
            (T("latent", "float32", ("B", L, "h", "w")),),
            (T("image", "float32", ("B", 3, "H", "W")),),  # in [-1, 1]
        ),
        "vae_encoder": GraphSpec(
            "vae_encoder",
            (T("image", "float32", ("B", 3, "H", "W")),),  # in [-1, 1]
            # the posterior's mean and log-variance stacked (diffusers' `moments`, before
            # DiagonalGaussianDistribution): the host draws the sample with the seed's stream
            (T("latent_parameters", "float32", ("B", 2 * L, "h", "w")),),
        ),
        "safety_checker": GraphSpec(
            "safety_checker",
            (T("clip_input", "float32", ("B", 3, SAFETY_SIZE, SAFETY_SIZE)),),
            # has_nsfw: forward_onnx's flags (unrounded); concept/special_scores: cosine
            # minus threshold, from which the host applies forward's rounded rule
            # (runtime/safety.py). Bundles before special_scores: has_nsfw is used.
            (T("has_nsfw", "bool", ("B",)), T("concept_scores", "float32", ("B", "K")),
             T("special_scores", "float32", ("B", SAFETY_SPECIAL))),
        ),
    }


# The hidden width C (768 for v1.x), concept count K and UNet input channels U are model
# facts: the manifest records concrete values in each tensor's shape; GRAPHS keeps them
# symbolic.
GRAPHS: dict[str, GraphSpec] = _graphs()
GRAPH_ORDER = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker")
REQUIRED_GRAPHS = ("text_encoder", "unet", "vae_decoder")


def _filled(g: GraphSpec, fill: dict[str, int]) -> GraphSpec:
    def sub(t: TensorSpec) -> TensorSpec:
        return TensorSpec(t.name, t.dtype, tuple(fill.get(a, a) for a in t.shape))

    return GraphSpec(g.name, tuple(map(sub, g.inputs)), tuple(map(sub, g.outputs)))


def graph_spec(name: str, hidden: int, concepts: int = SAFETY_CONCEPTS,
               unet_channels: int = LATENT_CHANNELS) -> GraphSpec:
    """GRAPHS[name] with the model's hidden width C, concept count K and UNet input
    channels U filled in."""
    return _filled(GRAPHS[name], {"C": hidden, "K": concepts, "U": unet_channels})


def legacy_specs(name: str, hidden: int, concepts: int, unet_channels: int) -> list[GraphSpec]:
    """The specs older bundles recorded, which this runtime still runs: the safety
    checker before special_scores (its flags only), the 1.0 UNet with exactly 77 tokens."""
    g = graph_spec(name, hidden, concepts, unet_channels)
    if name == "safety_checker":
        return [GraphSpec(name, g.inputs, g.outputs[:2])]
    if name == "unet":
        return [_filled(g, {"T": MAX_TOKENS})]
    return []


MAX_PROMPT_CHUNKS = 8  # 600 tokens per prompt at most: far past any real prompt, bounds memory


@dataclass(frozen=True)
class Profile:
    """Min/opt/max of images per call, image size in pixels (multiples of 8) and the
    UNet's text tokens (multiples of 77: one long-prompt chunk each)."""

    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] = (256, 512, 1024)
    width: tuple[int, int, int] = (256, 512, 1024)
    tokens: tuple[int, int, int] = (MAX_TOKENS, MAX_TOKENS, 3 * MAX_TOKENS)

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width", "tokens"):
            lo, opt, hi = getattr(self, name)
            if not (1 <= lo <= opt <= hi):
                raise ValueError(f"profile {name} must satisfy 1 <= min <= opt <= max: {lo, opt, hi}")
        for v in (*self.height, *self.width):
            if v % VAE_FACTOR:
                raise ValueError(f"profile sizes must be multiples of {VAE_FACTOR}: {v}")
        for v in self.tokens:
            if v % MAX_TOKENS or v > MAX_PROMPT_CHUNKS * MAX_TOKENS:
                raise ValueError(f"profile tokens must be multiples of {MAX_TOKENS} up to "
                                 f"{MAX_PROMPT_CHUNKS * MAX_TOKENS}: {v}")

    def axes(self, which: int, cfg: bool = True) -> dict[str, int]:
        """Named-axis values at min (0), opt (1) or max (2); N is 2B when `cfg`."""
        b, hh, ww = self.batch[which], self.height[which], self.width[which]
        return {"B": b, "N": 2 * b if cfg else b, "H": hh, "W": ww,
                "h": hh // VAE_FACTOR, "w": ww // VAE_FACTOR, "T": self.tokens[which]}

    def shapes(self, spec: GraphSpec) -> dict[str, dict[str, list[int]]]:
        """Per-input min/opt/max shapes. With guidance the UNet runs N = 2B and the text
        encoder 2B texts (prompts, then negative prompts) in one call, so their opt/max
        batch is 2B and their min B (guidance off)."""
        out: dict[str, dict[str, list[int]]] = {}
        for t in spec.inputs:
            row = {}
            for key, which in (("min", 0), ("opt", 1), ("max", 2)):
                axes = self.axes(which, cfg=key != "min")
                if spec.name == "text_encoder":
                    axes["B"] = axes["N"]
                row[key] = [axes[a] if isinstance(a, str) else a for a in t.shape]
            out[t.name] = row
        return out

    def covers(self, batch: int, height: int, width: int) -> bool:
        return all(lo <= v <= hi for v, (lo, _, hi) in
                   ((batch, self.batch), (height, self.height), (width, self.width)))

    def to_json(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width),
                "tokens": list(self.tokens)}


def fit_profile(default: int, min_size: int | None = None, max_size: int | None = None,
                max_batch: int | None = None, base: Profile | None = None,
                max_tokens: int | None = None) -> Profile:
    """The shape profile of a model whose default image side is `default` px: sides from
    `min_size` to `max_size`, 1 to `max_batch` images per call (each defaulting to
    `base`'s, Profile() if none, a bound not given moving to stay on its side of the
    other), opt at the default size and batch 1. A default size outside the bounds
    widens the bounds that were not given. ValueError (one line, naming the flags of
    export and engines.build) for bounds that are not multiples of 8 in [8, MAX_SIDE],
    a batch outside [1, MAX_BATCH], or a given bound that excludes the default size.
    `max_tokens`: the UNet's longest text (77 per long-prompt chunk; base's if None)."""
    base = base or Profile()
    tokens = base.tokens[2] if max_tokens is None else max_tokens
    top = MAX_PROMPT_CHUNKS * MAX_TOKENS
    if (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens % MAX_TOKENS
            or not MAX_TOKENS <= tokens <= top):
        raise ValueError(f"--max-tokens must be a multiple of {MAX_TOKENS} in [{MAX_TOKENS}, "
                         f"{top}] (one prompt chunk is {MAX_TOKENS} tokens), got {tokens!r}")
    lo = base.height[0] if min_size is None else min_size
    hi = base.height[2] if max_size is None else max_size
    batch = base.batch[2] if max_batch is None else max_batch
    for flag, v in (("--min-size", lo), ("--max-size", hi)):
        if (isinstance(v, bool) or not isinstance(v, int) or v % VAE_FACTOR
                or not VAE_FACTOR <= v <= MAX_SIDE):
            raise ValueError(f"{flag} must be a multiple of {VAE_FACTOR} in [{VAE_FACTOR}, "
                             f"{MAX_SIDE}] (pixels), got {v!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"--max-batch must be an integer in [1, {MAX_BATCH}], got {batch!r}")
    if min_size is None:  # a bound not given follows the one given
        lo = min(lo, hi)
    if max_size is None:
        hi = max(hi, lo)
    if lo > hi:
        raise ValueError(f"--min-size {lo} is larger than --max-size {hi}")
    if min_size is not None and default < min_size:
        raise ValueError(f"--min-size {min_size} is above the model's default size "
                         f"{default}x{default}; the profile must contain it")
    if max_size is not None and default > max_size:
        raise ValueError(f"--max-size {max_size} is below the model's default size "
                         f"{default}x{default}; the profile must contain it")
    lo, hi = min(lo, default), max(hi, default)
    return Profile((1, 1, batch), (lo, default, hi), (lo, default, hi),
                   (MAX_TOKENS, MAX_TOKENS, tokens))


@dataclass(frozen=True)
class WeightRef:
    """Where a torch parameter's weight is in a graph (export/weight_map.py): for LoRA."""

    initializer: str  # its ONNX initializer's name
    transposed: bool  # stored as the parameter transposed (a MatMul's [in, out])
    file: str  # the graph file or its external data file (a name in the bundle)
    offset: int  # byte offset of its float32 little-endian data in `file`
    shape: tuple[int, ...]  # the initializer's shape

    def to_json(self) -> list:
        return [self.initializer, self.transposed, self.file, self.offset, list(self.shape)]


@dataclass(frozen=True)
class GraphEntry:
    """One graph as the manifest records it."""

    spec: GraphSpec
    sha256: str  # of the .onnx file
    external_data: str | None = None  # file name beside it, when the graph is > 2 GB
    external_sha256: str | None = None
    max_abs_error: float | None = None  # ONNX Runtime vs torch right after export
    xxh3: str | None = None  # xxh3-128 of the .onnx (runtime.integrity), checked at every load
    external_xxh3: str | None = None
    weights: dict[str, WeightRef] | None = None  # text encoder, UNet: parameter -> where

    @property
    def file(self) -> str:
        return self.spec.file


@dataclass(frozen=True)
class Manifest:
    source: dict  # {"model": id or path, "hash": sha256 of the source weights}
    hidden: int  # text hidden width C (768 for v1.x)
    graphs: dict[str, GraphEntry]
    profile: Profile
    default_height: int
    default_width: int
    opset: int
    packages: dict[str, str] = field(default_factory=dict)
    vae_scaling: str = "host"  # the host multiplies latents by 1/vae_scaling_factor
    vae_scaling_factor: float = VAE_SCALING_FACTOR
    format_version: int = FORMAT_VERSION
    format_minor: int = FORMAT_MINOR  # 0: written before 1.1 (module doc)

    @property
    def unet_channels(self) -> int:
        """U: 4, or 9 for an inpainting UNet (latents, mask, masked-image latents)."""
        return int(self.graphs["unet"].spec.inputs[0].shape[1])

    @property
    def max_text_tokens(self) -> int | None:
        """The most text tokens the UNet takes: 77 for a 1.0 bundle (its text axis is
        fixed), None (any multiple of 77) since 1.1; engines built for a profile may
        take fewer (Engine.refuses)."""
        t = self.graphs["unet"].spec.inputs[2].shape[1]
        return t if isinstance(t, int) else None

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "format_minor": self.format_minor,
            "source": self.source,
            "packages": self.packages,
            "opset": self.opset,
            "hidden": self.hidden,
            "vae_scaling": self.vae_scaling,
            "vae_scaling_factor": self.vae_scaling_factor,
            "default_height": self.default_height,
            "default_width": self.default_width,
            "profile": self.profile.to_json(),
            "graphs": {
                name: {
                    "file": e.file,
                    "sha256": e.sha256,
                    "external_data": e.external_data,
                    "external_sha256": e.external_sha256,
                    "xxh3": e.xxh3,
                    "external_xxh3": e.external_xxh3,
                    "max_abs_error": e.max_abs_error,
                    "inputs": [t.to_json() for t in e.spec.inputs],
                    "outputs": [t.to_json() for t in e.spec.outputs],
                    "shapes": self.profile.shapes(e.spec),
                    **({"weights": {k: w.to_json() for k, w in e.weights.items()}}
                       if e.weights else {}),
                }
                for name, e in self.graphs.items()
            },
        }

    def write(self, bundle: Path) -> None:
        path = Path(bundle) / MANIFEST
        write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fail(path: Path, what: str) -> BundleError:
    return BundleError(f"corrupt {path}: {what}; re-export the bundle")


def _int(path: Path, what: str, v: object, lo: int, hi: int) -> int:
    """`v` as an int in [lo, hi]; JSON true/false and floats are not ints here."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(path, f"{what} must be an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def is_hex(v: object, digits: int) -> bool:
    """A lowercase hex digest of `digits` digits (sha256: 64, xxh3-128: 32)."""
    return isinstance(v, str) and len(v) == digits and all(c in "0123456789abcdef" for c in v)


def _hex(path: Path, what: str, v: object, digits: int, optional: bool = True) -> str | None:
    if v is None and optional:
        return None
    if not is_hex(v, digits):
        raise _fail(path, f"{what} must be {digits} lowercase hex digits, got {_short(v)}")
    return v


def _short(v: object) -> str:
    text = repr(v) if not isinstance(v, int) or abs(v) < 10**12 else f"an integer of {len(str(v))} digits"
    return text if len(text) <= 60 else text[:57] + "..."


def _tensor(path: Path, where: str, d: object) -> TensorSpec:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise _fail(path, f"{where}: a tensor must be an object with a name, got {_short(d)}")
    shape = d.get("shape")
    if d.get("dtype") not in DTYPES or not isinstance(shape, list) or not 1 <= len(shape) <= 8:
        raise _fail(path, f"{where}.{d['name']}: bad dtype {_short(d.get('dtype'))} or shape "
                          f"{_short(shape)}")
    for a in shape:
        if not (isinstance(a, str) and a in AXES) and (
                isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= MAX_DIM):
            raise _fail(path, f"{where}.{d['name']}: shape {_short(shape)} has an axis that is "
                              f"neither a size in [1, {MAX_DIM}] nor one of {', '.join(AXES)}")
    return TensorSpec(d["name"], d["dtype"], tuple(shape))


def _graph_entry(path: Path, name: str, g: object, hidden: int) -> GraphEntry:
    """One manifest graph, checked field by field and against this runtime's contract."""
    if not isinstance(g, dict):
        raise _fail(path, f"graph {name!r} is not an object")
    ios = []
    for side in ("inputs", "outputs"):
        if not isinstance(g.get(side), list):
            raise _fail(path, f"{name}.{side} must be a list")
        ios.append(tuple(_tensor(path, name, t) for t in g[side]))
    spec = GraphSpec(name, ios[0], ios[1])
    concepts = next((t.shape[-1] for t in spec.outputs if t.name == "concept_scores"
                     and isinstance(t.shape[-1], int)), SAFETY_CONCEPTS)
    channels = next((t.shape[1] for t in spec.inputs if name == "unet" and t.name == "sample"
                     and len(t.shape) > 1 and t.shape[1] == INPAINT_CHANNELS), LATENT_CHANNELS)
    if spec not in (graph_spec(name, hidden, concepts, channels),
                    *legacy_specs(name, hidden, concepts, channels)):
        raise _fail(path, f"{name}'s inputs/outputs are not this runtime's contract for it "
                          f"(names, dtypes, ranks)")
    external = g.get("external_data")
    if external is not None and not isinstance(external, str):
        raise _fail(path, f"{name}.external_data must be a file name, got {_short(external)}")
    if external is not None and g.get("external_sha256") is None:  # else never hashed
        raise _fail(path, f"{name}.external_data has no external_sha256")
    weights = _weights(path, name, g.get("weights"), {f"{name}.onnx", external} - {None})
    err = g.get("max_abs_error")
    if err is not None and (isinstance(err, bool) or not isinstance(err, (int, float))
                            or not 0 <= err < math.inf):
        raise _fail(path, f"{name}.max_abs_error must be a number >= 0, got {_short(err)}")
    return GraphEntry(spec, str(_hex(path, f"{name}.sha256", g.get("sha256"), 64, optional=False)),
                      external, _hex(path, f"{name}.external_sha256", g.get("external_sha256"), 64),
                      None if err is None else float(err),
                      _hex(path, f"{name}.xxh3", g.get("xxh3"), 32),
                      _hex(path, f"{name}.external_xxh3", g.get("external_xxh3"), 32), weights)


def _weights(path: Path, name: str, d: object, files: set) -> dict[str, WeightRef] | None:
    """The LoRA name map of one graph: each entry [initializer, transposed, file, offset,
    shape], its file one of the graph's own."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail(path, f"{name}.weights must be an object")
    out, initializers = {}, set()
    for param, w in d.items():
        ok = (isinstance(w, list) and len(w) == 5 and isinstance(w[0], str)
              and isinstance(w[1], bool) and isinstance(w[2], str) and w[2] in files
              and not isinstance(w[3], bool) and isinstance(w[3], int) and 0 <= w[3] < 1 << 50
              and isinstance(w[4], list) and 1 <= len(w[4]) <= 4
              and all(not isinstance(v, bool) and isinstance(v, int) and 1 <= v <= MAX_DIM
                      for v in w[4])
              and (not w[1] or len(w[4]) == 2))  # only a Linear's [in, out] is transposed
        if not ok:
            raise _fail(path, f"{name}.weights[{_short(param)}] must be [initializer, "
                              f"transposed, one of the graph's files, offset, shape], got {_short(w)}")
        if w[0] in initializers:
            raise _fail(path, f"{name}.weights: two parameters name initializer {_short(w[0])}")
        initializers.add(w[0])
        out[str(param)] = WeightRef(w[0], w[1], w[2], w[3], tuple(w[4]))
    return out


def _profile(path: Path, d: object) -> Profile:
    if not isinstance(d, dict):
        raise _fail(path, "profile must be an object")
    rows = []
    limits = (("batch", MAX_BATCH), ("height", MAX_SIDE), ("width", MAX_SIDE),
              ("tokens", MAX_PROMPT_CHUNKS * MAX_TOKENS))
    for name, hi in limits:
        if name == "tokens" and "tokens" not in d:  # format 1.0: the UNet takes 77 only
            rows.append((MAX_TOKENS,) * 3)
            continue
        row = d.get(name)
        if not isinstance(row, list) or len(row) != 3:
            raise _fail(path, f"profile.{name} must be [min, opt, max], got {_short(row)}")
        rows.append(tuple(_int(path, f"profile.{name}", v, 1, hi) for v in row))
    try:
        return Profile(*rows)
    except ValueError as e:
        raise _fail(path, str(e)) from None


def inside(bundle: Path, *names: str) -> Path:
    """bundle/names..., refused (BundleError) when it resolves outside the bundle: a
    symlinked manifest, config, tokenizer folder or file must never make the runtime
    read another folder's files. The bundle folder itself may be a link."""
    path = Path(bundle).joinpath(*names)
    try:
        target, root = path.resolve(), Path(bundle).resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise BundleError(f"bundle {bundle}: cannot resolve {path}: {first_line(e)}") from None
    if not target.is_relative_to(root):
        raise BundleError(f"bundle {bundle}: {'/'.join(names)} links outside the bundle "
                          f"({target}); refusing to read it")
    return path


def read_manifest(bundle: Path | str) -> Manifest:
    """Parse and check `bundle/manifest.json` (every field's type and range, each graph
    against this runtime's contract, files inside the bundle); raise BundleError with a
    one-line fix."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"model folder not found: {bundle}")
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle (no {MANIFEST}); create one with "
                          f"`python -m export --model MODEL --out {bundle}`")
    inside(bundle, MANIFEST)
    try:
        d = json.loads(read_small(path, MAX_JSON_BYTES).decode())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"corrupt {path}: {first_line(e)}; re-export the bundle") from None
    version = d.get("format_version") if isinstance(d, dict) else None
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format version {version!r}, this runtime reads "
                          f"version {FORMAT_VERSION}; re-export it with this version's "
                          f"`python -m export`")
    assert isinstance(d, dict)
    for key in ("source", "packages"):
        if not isinstance(d.get(key, {}), dict):
            raise _fail(path, f"{key} must be an object")
    hidden = _int(path, "hidden", d.get("hidden"), 1, MAX_DIM)
    profile = _profile(path, d.get("profile"))
    default_height = _int(path, "default_height", d.get("default_height"), VAE_FACTOR, MAX_SIDE)
    default_width = _int(path, "default_width", d.get("default_width"), VAE_FACTOR, MAX_SIDE)
    if default_height % VAE_FACTOR or default_width % VAE_FACTOR:
        raise _fail(path, f"the default size {default_width}x{default_height} is not a "
                          f"multiple of {VAE_FACTOR}")
    factor = d.get("vae_scaling_factor", VAE_SCALING_FACTOR)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1e6:
        raise _fail(path, f"vae_scaling_factor must be a positive number, got {_short(factor)}")
    if d.get("vae_scaling", "host") != "host":
        raise BundleError(f"{path}: vae_scaling {d.get('vae_scaling')!r} is not supported by "
                          f"this runtime (it scales latents on the host); re-export the bundle")
    if not isinstance(d.get("graphs"), dict):
        raise _fail(path, "graphs must be an object")
    graphs = {}
    for name, g in d["graphs"].items():
        if name not in GRAPHS:
            raise BundleError(f"{path}: unknown graph {name!r}")
        graphs[name] = _graph_entry(path, name, g, hidden)
    missing = [g for g in REQUIRED_GRAPHS if g not in graphs]
    if missing:
        raise BundleError(f"{path}: missing graphs {', '.join(missing)}; re-export the bundle")
    manifest = Manifest(
        source=d.get("source", {}), hidden=hidden, graphs=graphs, profile=profile,
        default_height=default_height, default_width=default_width,
        opset=_int(path, "opset", d.get("opset"), 7, 100), packages=d.get("packages", {}),
        vae_scaling="host", vae_scaling_factor=float(factor), format_version=version,
        format_minor=_int(path, "format_minor", d.get("format_minor", 0), 0, 1 << 20),
    )
    root = bundle.resolve()
    for e in graphs.values():
        for f in filter(None, (e.file, e.external_data)):
            # a plain file name, and no symlink out of the bundle: a manifest or a link
            # must never make the runtime read /etc/passwd or another folder's files
            if Path(f).name != f or f in (".", ".."):
                raise BundleError(f"corrupt {path}: {e.spec.name}'s file {f!r} is not a file "
                                  f"name in the bundle; re-export the bundle")
            target = bundle / f
            if target.exists() and not target.resolve().is_relative_to(root):
                raise BundleError(f"bundle {bundle}: {f} links outside the bundle "
                                  f"({target.resolve()}); refusing to read it")
            if not target.is_file():
                raise BundleError(f"bundle {bundle} is missing {f}" + (
                    " (not a regular file)" if target.exists() else "") + "; re-export the bundle")
    return manifest


def integrity_files(bundle: Path | str, manifest: Manifest,
                    names: Iterable[str]) -> list[tuple[Path, str | None, str | None]]:
    """(file, sha256, xxh3) of every file of the named graphs: what runtime.integrity checks."""
    out = []
    for name in names:
        e = manifest.graphs[name]
        out.append((Path(bundle) / e.file, e.sha256, e.xxh3))
        if e.external_data:
            out.append((Path(bundle) / e.external_data, e.external_sha256, e.external_xxh3))
    return out


def verify_hashes(bundle: Path | str, manifest: Manifest, only: str | None = None) -> None:
    """Check graph files (all, or graph `only`) against the manifest: xxh3 where it is
    recorded (0.4 s for a full-size UNet), else sha256 (2 s). BundleError on a mismatch."""
    from runtime import integrity

    names = [n for n in manifest.graphs if only is None or n == only]
    for f, sha, fast in integrity_files(bundle, manifest, names):
        if not integrity.matches(f, sha, fast):
            raise mismatch(f)


def mismatch(f: Path) -> BundleError:
    return BundleError(f"{f} does not match its hash in the manifest (damaged or edited "
                       f"after export); re-export the bundle")


def demo_bundle() -> Path:
    """The built-in tiny demo bundle shipped inside the package."""
    return Path(__file__).resolve().parent / "demo_bundle"


def resolve_model(model: str | os.PathLike) -> Path:
    """`demo` means the built-in bundle; anything else is a bundle folder."""
    return demo_bundle() if str(model) == "demo" else Path(model)

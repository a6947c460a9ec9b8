"""LoRA files -> per-parameter weight deltas, numpy only (issue 14).

Reads the two layouts diffusers 0.42's StableDiffusionLoraLoaderMixin.load_lora_weights reads:
  kohya / A1111   lora_unet_<module_with_underscores>.lora_down.weight, .lora_up.weight, .alpha;
                  lora_te_ (or lora_te1_, which diffusers' convert_state_dict_to_kohya writes)
                  for the CLIP text encoder
  diffusers/PEFT  unet.<module>.lora_A.weight, .lora_B.weight, text_encoder.<module>...; also the
                  older names diffusers still converts (state_dict_utils.py): ...attn1.processor
                  .to_q_lora.down.weight, ...ff.net.2.lora.down.weight, ...fc1.lora_linear_layer...
kohya's underscores are ambiguous (`to_out_0`, `ff_net_0_proj`), so its names are matched
against the model's real parameter names, never guessed. A text encoder's names match with
or without transformers' `text_model.` prefix (transformers 5 dropped it; files keep it).

The delta is peft's LoraLayer.get_delta_weight (peft/tuners/lora/layer.py), times the user's
scale as diffusers' fuse_lora(lora_scale=) multiplies it into peft's `scaling`:
    W' = W + scale * scaling * up @ down,   scaling = alpha / rank  (alpha / sqrt(rank): rslora)
alpha: kohya's `.alpha` per module (none: alpha = rank, as kohya and A1111 do; where alphas
differ, diffusers 0.42 gives attention projections the most common one); PEFT: lora_alpha and
alpha_pattern from the `lora_adapter_metadata` header that save_lora_weights(...,
unet_lora_adapter_metadata=) writes, else alpha = rank (scale 1), as diffusers does.
Weights are converted to float32 (bf16 by hand: numpy has no bfloat16); the delta is computed
in float32 and matches peft's fused weights within ~1e-6 relative (tests/test_lora.py).
Only safetensors are read: pickles (.ckpt/.pt/.bin) are refused, never opened.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open


class LoraError(ValueError):
    """A LoRA file this model cannot use; the message is one line a user can act on."""


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One parameter's low-rank update; its shape is (up.shape[0], *down.shape[1:])."""

    key: str  # the file's name for it, for messages ("lora_unet_..._to_q", "unet.....to_q")
    down: np.ndarray  # [r, in] or [r, in, kh, kw] float32 (lora_down / lora_A)
    up: np.ndarray  # [out, r] or [out, r, 1, 1] float32 (lora_up / lora_B)
    scaling: float  # peft's: alpha / r


@dataclass(frozen=True, eq=False)
class LoraFile:
    """What read_lora returns."""

    path: Path
    format: str  # "kohya" or "peft"
    layers: dict[tuple[str, str], LoraLayer]  # (component, parameter name) -> layer


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
METADATA_KEY = "lora_adapter_metadata"  # diffusers/loaders/lora_base.py LORA_ADAPTER_METADATA_KEY
KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
PEFT = {"unet.": "unet", "text_encoder.": "text_encoder"}
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up",  # today's PEFT names
                 ".lora.down.weight": "down", ".lora.up.weight": "up",  # older diffusers
                 ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
                 "_lora.down.weight": "down", "_lora.up.weight": "up"}  # attn processors
# The attention processors' `to_q_lora` named the module's q/k/v/out projection
# (state_dict_utils.py UNET_TO_DIFFUSERS, DIFFUSERS_OLD_TO_PEFT).
PROCESSOR_NAMES = {"unet": {"to_out": "to_out.0"},
                   "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                                    "to_out": "out_proj"}}
SDXL_NAMES = ("input_blocks", "middle_block", "output_blocks", "lora_te2_", "text_encoder_2.",
              "add_embedding", "label_emb")


MAX_SCALE = 100.0  # |scale| of a LoRA: far past any useful one (--lora, set_loras, <lora:...>)


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`--lora FILE[:SCALE]` (export and runtime.generate): scale 1.0 by default; a path
    may itself hold colons. LoraError for a scale outside [-100, 100] (NaN too)."""
    path, _, scale = text.rpartition(":")
    value = 1.0
    if path:
        try:
            value = float(scale)
        except ValueError:
            path = text  # the colon was part of the path
    else:
        path = text
    if not -MAX_SCALE <= value <= MAX_SCALE:
        raise LoraError(f"--lora {text}: the scale must be a number in [{-MAX_SCALE:g}, {MAX_SCALE:g}]")
    return Path(path), value


def read_lora(path: str | Path, params: Mapping[str, Mapping[str, tuple[int, ...]]]) -> LoraFile:
    """The LoRA file at `path`, mapped onto `params`: component ("unet", "text_encoder") ->
    {parameter name: shape} of the model. Raises LoraError (one line) for a pickle or
    non-safetensors file, a file without LoRA weights, a key that matches no parameter (a
    LoRA for another architecture) and shapes that do not fit the parameter."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"{path}: {path.suffix} files are pickles, which are never loaded; "
                        "use the LoRA's .safetensors file")
    tensors, header = read_tensors(path)
    if not tensors:
        raise LoraError(f"{path}: no LoRA weights in it")
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # (component, module) -> role -> tensor
    formats = set()
    for key in sorted(tensors):
        fmt, component, module, role = _split(path, key)
        formats.add(fmt)
        parts.setdefault((component, module), {})[role] = tensors[key]
    if len(formats) > 1:
        raise LoraError(f"{path}: mixes kohya (lora_unet_...) and diffusers (unet....) names")
    fmt = formats.pop()
    config = _adapter_config(path, header) if fmt == "peft" else {}
    indexes = {c: _index(c, shapes) for c, shapes in params.items()}
    layers: dict[tuple[str, str], LoraLayer] = {}
    for (component, module), p in parts.items():
        key = f"{component}.{module}" if fmt == "peft" else module
        name = indexes.get(component, {}).get(module)
        if name is None:
            hint = " (its names are SDXL's)" if any(s in key for s in SDXL_NAMES) else ""
            raise LoraError(f"{path}: {key} matches no {component} parameter of this model: "
                            f"a LoRA for another architecture{hint}")
        if (component, name) in layers:
            raise LoraError(f"{path}: {key} and {layers[component, name].key} both update {name}")
        down, up = _factors(path, key, p, name, tuple(params[component][name]))
        rank = down.shape[0]
        if fmt == "kohya":  # kohya's lora.py and A1111: no alpha means alpha = rank
            scaling = (float(p["alpha"].reshape(-1)[0]) if "alpha" in p else rank) / rank
        else:
            # patterns name modules as the file does (transformers 4's `text_model.` prefix
            # included), else as this model does
            scaling = _peft_scaling(path, key, config.get(component),
                                    (module, name.removesuffix(".weight")), rank)
        layers[component, name] = LoraLayer(key, down, up, scaling)
    return LoraFile(path, fmt, layers)


def delta(layer: LoraLayer, scale: float, transposed: bool = False,
          scratch: np.ndarray | None = None) -> np.ndarray:
    """scale * scaling * up @ down in the parameter's shape, float32: [out, in] for a Linear,
    [out, in, kh, kw] for a Conv2d (peft's conv delta: a 1x1 `up` after the `down` conv is
    a matmul over the rank, i.e. einsum("or,rikl->oikl")). `transposed` (a Linear): the
    [in, out] delta of a weight stored transposed, computed as down.T @ up.T, so no copy
    of a large matrix is ever transposed. `scratch`: a float32 buffer of at least the
    weight's size to compute it in (a swap reuses one instead of faulting in new pages)."""
    out, rank = layer.up.shape[:2]
    up, down = layer.up.reshape(out, rank), layer.down.reshape(rank, -1)
    if transposed and layer.down.ndim != 2:
        raise ValueError(f"{layer.key}: only a Linear's weight is stored transposed")
    # the scale goes on the rank-sized factor, not the full product (peft multiplies
    # (B @ A) by it: a pass over the whole weight more; the two differ by rounding only)
    s = np.float32(scale * layer.scaling)
    a, b = (down.T, up.T * s) if transposed else (up * s, down)  # [in, out] / [out, in*kh*kw]
    d = None if scratch is None else scratch[:a.shape[0] * b.shape[1]].reshape(a.shape[0], b.shape[1])
    d = np.matmul(a, b, out=d)
    return d if transposed else d.reshape(out, *layer.down.shape[1:])


def _factors(path: Path, key: str, p: Mapping[str, np.ndarray], name: str,
             shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) of one module, checked against its parameter's shape: a Linear [out, in]
    takes down [r, in] and up [out, r]; a Conv2d [out, in, kh, kw] (peft's and kohya's
    LoCon) down [r, in, kh, kw], a conv with the parameter's kernel, and up [out, r, 1, 1]."""
    if "down" not in p or "up" not in p:
        raise LoraError(f"{path}: {key} has no {'down' if 'down' not in p else 'up'} weight")
    down, up = p["down"], p["up"]
    rank = down.shape[0]
    if not (rank >= 1 and len(shape) in (2, 4) and down.shape == (rank, *shape[1:])
            and up.shape == (shape[0], rank, 1, 1)[:len(shape)]):
        raise LoraError(f"{path}: {key} down {list(down.shape)} and up {list(up.shape)} do "
                        f"not fit {name} {list(shape)}: a LoRA for another architecture")
    return down, up


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file as float32, and the header's __metadata__ ({}
    when none). LoraError (one line) for a missing or damaged file or a non-float tensor."""
    try:
        with safe_open(str(path), "np") as f:
            header = f.metadata() or {}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            out = {k: f.get_tensor(k).astype(np.float32) for k, d in dtypes.items()
                   if d in ("F16", "F32", "F64")}
    except FileNotFoundError:
        raise LoraError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{path}: not a safetensors file ({e})") from None
    for k, d in dtypes.items():
        if d == "BF16":
            out[k] = _bf16(path, k)
        elif d not in ("F16", "F32", "F64"):
            raise LoraError(f"{path}: tensor {k} is {d}; LoRA weights are floating point")
    return out, header


def _bf16(path: Path, key: str) -> np.ndarray:
    """A bf16 tensor as float32, exactly: bf16 is float32's upper 16 bits. safetensors.numpy
    cannot read it, so it is read at its header offsets (the format: u64 LE header size, JSON
    header, data; safe_open has validated both)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))[key]
        begin, end = entry["data_offsets"]
        f.seek(8 + n + begin)
        bits = np.frombuffer(f.read(end - begin), "<u2")
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def _split(path: Path, key: str) -> tuple[str, str, str, str]:
    """A tensor's (format, component, module as the file names it, role "down"|"up"|"alpha")."""
    for prefixes, suffixes, fmt in ((KOHYA, KOHYA_SUFFIXES, "kohya"),
                                    (PEFT, PEFT_SUFFIXES, "peft")):
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if prefix is None or suffix is None:
            continue
        if fmt == "kohya":  # the whole lora_unet_... name: _index spells modules so
            return fmt, prefixes[prefix], key[:-len(suffix)], suffixes[suffix]
        component = prefixes[prefix]
        module = key[len(prefix):-len(suffix)].replace(".processor.", ".")
        if suffix.startswith("_lora"):  # attn1.processor.to_out_lora -> attn1.to_out.0
            head, _, last = module.rpartition(".")
            module = f"{head}.{PROCESSOR_NAMES[component].get(last, last)}"
        return fmt, component, module, suffixes[suffix]
    if any(s in key for s in SDXL_NAMES):
        raise LoraError(f"{path}: {key} is an SDXL name: a LoRA for another architecture")
    raise LoraError(f"{path}: {key} is no kohya (lora_unet_/lora_te_) or diffusers "
                    "(unet./text_encoder.) LoRA weight: a LoRA for another architecture or of "
                    "a kind not applied here (LoHa, LoKr, DoRA, LoRA biases)")


def _index(component: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str | None]:
    """{module name as a file may spell it: parameter name} for the weights (2+ dims):
    dotted for PEFT, kohya's lora_<prefix> + underscores; None where two parameters
    spell the same (then no LoRA key may use it)."""
    out: dict[str, str | None] = {}
    kohya = [p for p, c in KOHYA.items() if c == component]
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        module = name.removesuffix(".weight")
        modules = {module}
        if component == "text_encoder":  # transformers 5 dropped CLIPTextModel.text_model
            modules |= {module.removeprefix("text_model."), f"text_model.{module}"}
        spellings = modules | {p + m.replace(".", "_") for p in kohya for m in modules}
        for s in spellings:
            out[s] = name if out.get(s, name) == name else None
    return out


def _adapter_config(path: Path, header: Mapping[str, str]) -> dict[str, dict]:
    """component -> its LoraConfig kwargs from the header, as diffusers' save_lora_weights
    packs them ({"unet.r": 4, "unet.lora_alpha": 8, ...}, lora_base._pack_dict_with_prefix)."""
    if METADATA_KEY not in header:
        return {}
    try:
        flat = json.loads(header[METADATA_KEY])
        assert isinstance(flat, dict)
    except (ValueError, AssertionError):
        raise LoraError(f"{path}: its {METADATA_KEY} header is not a JSON object") from None
    out: dict[str, dict] = {}
    for k, v in flat.items():
        component, _, field = k.partition(".")
        out.setdefault(component, {})[field] = v
    return out


def _peft_scaling(path: Path, key: str, config: dict | None, modules: tuple[str, str],
                  rank: int) -> float:
    """peft's scaling for one module: LoraModel._create_and_replace picks r and lora_alpha
    from rank_pattern / alpha_pattern (first regex matching the module name's end,
    peft.utils.other.get_pattern_key), and LoraLayer.update_layer divides. No config: 1.
    `modules`: the module's name in the file, then in this model (tried in that order)."""
    if config is None:
        return 1.0
    if config.get("use_dora"):
        raise LoraError(f"{path}: a DoRA adapter (use_dora), which this reader does not apply")
    try:
        ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        r = _pattern(ranks, modules[0], _pattern(ranks, modules[1], config["r"]))
        alpha = _pattern(alphas, modules[0], _pattern(alphas, modules[1], config["lora_alpha"]))
        r, alpha = int(r), float(alpha)
    except (KeyError, TypeError, ValueError, re.error):
        raise LoraError(f"{path}: its {METADATA_KEY} has no usable r / lora_alpha") from None
    if r != rank:
        raise LoraError(f"{path}: {key} has rank {rank} but its {METADATA_KEY} says {r}")
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _pattern(patterns: Mapping[str, object], module: str, default: object) -> object:
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return value
    return default

"""Resolve `--model` to Components: demo, sd14-random, a diffusers folder, a single-file
checkpoint, or a Hugging Face hub id (downloaded only where the hub is reachable).

Every user mistake raises ExportError with one line that says what to do.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from export.checks import REQUIRED, check_diffusers_folder, model_kind
from export.configs import SD14, ModelConfig
from export.errors import ExportError

if TYPE_CHECKING:
    from export.components import Components


def load_components(model: str, *, allow_pickle: bool = False, safety: bool = True,
                    seed: int = 0, variant: str | None = None) -> Components:
    """Components for a `--model` value (see module doc); `variant` ("fp16"): which
    weights a hub export downloads (hub ids only)."""
    kind = model_kind(model, allow_pickle, safety)
    if variant is not None and kind != "hub":
        raise ExportError(f"--variant picks which weights a hub export downloads; {model} is "
                          f"not a hub id")
    if kind == "built-in":
        from export.components import build_components

        return build_components(model, seed=seed, safety=safety)
    path = Path(model).expanduser()
    if kind == "folder":
        return load_diffusers_folder(path, allow_pickle=allow_pickle, safety=safety)
    if kind == "file":
        return load_single_file(path, allow_pickle=allow_pickle)
    return load_from_hub(model, allow_pickle=allow_pickle, safety=safety, variant=variant)


def load_diffusers_folder(path: Path, *, allow_pickle: bool = False, safety: bool = True,
                          model_id: str | None = None,
                          variants: dict[str, str | None] | None = None) -> Components:
    """A diffusers StableDiffusionPipeline folder (model_index.json + component folders).
    `variants` (component -> weights variant, None: the default weights) overrides what
    the folder's files suggest: a hub snapshot folder also keeps files fetched earlier."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextModel

    from export.components import Components

    found, use_checker = check_diffusers_folder(path, allow_pickle, safety)
    variants = {**found, **(variants or {})}
    try:
        sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        scheduler_cls = getattr(diffusers, sched_cfg["_class_name"])

        def load(cls, sub):
            kw = {"subfolder": sub, "local_files_only": True, "variant": variants[sub],
                  "use_safetensors": None if allow_pickle else True}
            return cls.from_pretrained(path, **kw).float().eval()

        text = load(CLIPTextModel, "text_encoder")
        unet = load(UNet2DConditionModel, "unet")
        vae = load(AutoencoderKL, "vae")
        checker = load(StableDiffusionSafetyChecker, "safety_checker") if use_checker else None
        scheduler = scheduler_cls.from_pretrained(path, subfolder="scheduler")
    except ExportError:
        raise
    except Exception as e:  # diffusers/transformers raise many types for a broken folder
        raise ExportError(f"cannot load {path} as a diffusers model: {_one_line(e)}") from None
    return Components(text, unet, vae, checker, scheduler, path / "tokenizer",
                      model_id or str(path))


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def write_config_folder(cfg: ModelConfig, dest: Path) -> None:
    """A diffusers-style folder with `cfg`'s component configs and no weights, for
    from_single_file(config=...) where no hub is reachable."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from export.clip_vocab import write_tokenizer_files

    index = {
        "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))
    CLIPTextConfig(**cfg.copy("text_encoder")).save_pretrained(dest / "text_encoder")
    for cls, sub, kw in ((UNet2DConditionModel, "unet", cfg.copy("unet")),
                         (AutoencoderKL, "vae", cfg.copy("vae"))):
        (dest / sub).mkdir()
        (dest / sub / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **kw}, indent=2))
    PNDMScheduler.from_config(cfg.copy("scheduler")).save_config(dest / "scheduler")
    write_tokenizer_files(dest / "tokenizer")


def load_single_file(path: Path, *, allow_pickle: bool = False, config: ModelConfig = SD14) -> Components:
    """An original-format (CompVis/LDM) checkpoint: UNet, VAE and CLIP text in one file.

    Loaded with diffusers' from_single_file against a local folder of `config`'s component
    configs (v1-4's by default). Such files carry no safety checker, so the bundle has none.
    """
    model_kind(str(path), allow_pickle)  # pickle / suffix checks
    from diffusers import StableDiffusionPipeline

    from export.components import Components

    with tempfile.TemporaryDirectory(prefix="sd-config-") as tmp:
        write_config_folder(config, Path(tmp))
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=tmp, local_files_only=True, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        except Exception as e:
            raise ExportError(f"cannot load {path} as a Stable Diffusion v1.x checkpoint: "
                              f"{_one_line(e)}") from None
        return Components(pipe.text_encoder.float().eval(), pipe.unet.float().eval(),
                          pipe.vae.float().eval(), None, pipe.scheduler, None, str(path))


# diffusers/transformers weight files, as diffusers' variant_compatible_siblings reads them
# (diffusers/pipelines/pipeline_loading_utils.py): model[-00001-of-00002][.fp16].safetensors,
# model.fp16-00001-of-00002.safetensors, and their index files (model.safetensors.index[.fp16].json,
# legacy model.safetensors.fp16.index.json)
_PREFIX = r"(?:diffusion_pytorch_model|model|pytorch_model)"
_SHARD = r"\d{5}-of-\d{5}"
_WEIGHT = re.compile(rf"{_PREFIX}(?:-{_SHARD})?(?:\.(?P<v>\w+?)(?:-{_SHARD})?)?\.(?P<fmt>safetensors|bin)")
_INDEX = re.compile(rf"{_PREFIX}\.(?P<fmt>safetensors|bin)"
                    rf"(?:\.index(?:\.(?P<v>\w+))?|\.(?P<lv>\w+)\.index)\.json")
WEIGHTED = ("text_encoder", "unet", "vae", "safety_checker")  # the folders whose weights export loads


def _weight_kind(name: str) -> tuple[tuple[str | None, str], bool] | None:
    """((variant or None, "safetensors" | "bin"), is an index file) for a weight file name."""
    m = _WEIGHT.fullmatch(name)
    if m:
        return (m["v"], m["fmt"]), False
    m = _INDEX.fullmatch(name)
    return ((m["v"] or m["lv"], m["fmt"]), True) if m else None


def hub_files(repo_id: str, names: list[str], *, allow_pickle: bool, safety: bool,
              variant: str | None = None) -> list[str]:
    """The files of a hub repo (`names`, as list_repo_files gives them) an export downloads.

    model_index.json and the component folders export reads (safety_checker and
    feature_extractor only with `safety`): their .json/.txt files and one weights choice
    per folder, as diffusers picks it: the default (non-variant) weights, else the fp16
    variant (diffusers' variant="fp16"); within that, safetensors, else .bin with
    `allow_pickle`. `variant="fp16"` (export --variant fp16) prefers the fp16 weights
    (half the download), falling back to the default per folder, as diffusers does.
    Other variants (fp16 beside the default, ema, non_ema), top-level
    checkpoints and other formats are left out. Raises ExportError (one line) where the
    repo is not a usable SD v1.x diffusers model, before anything is downloaded.
    """
    folders: tuple[str, ...] = REQUIRED
    if safety:
        folders += ("safety_checker", "feature_extractor")
    if "model_index.json" not in names:
        raise ExportError(f"{repo_id} is not a diffusers model (no model_index.json)")
    by_folder: dict[str, list[str]] = {}
    for name in names:
        folder, _, base = name.partition("/")
        if folder in folders and base and "/" not in base:
            by_folder.setdefault(folder, []).append(base)
    missing = [d for d in REQUIRED if d not in by_folder]
    if missing:
        raise ExportError(f"{repo_id} is not a Stable Diffusion v1.x diffusers model "
                          f"(missing {', '.join(missing)})")
    formats = ("safetensors", "bin") if allow_pickle else ("safetensors",)
    chosen = ["model_index.json"]
    for folder, bases in by_folder.items():
        kinds = {b: _weight_kind(b) for b in bases}
        found = {k[0] for k in kinds.values() if k and not k[1]}  # weight files, not indexes
        order = (variant, None) if variant else (None, "fp16")
        pick = next(((v, f) for v in order for f in formats if (v, f) in found), None)
        if pick is None and folder in WEIGHTED:
            if any(f == "bin" and v in (None, "fp16") for v, f in found):
                raise ExportError(f"{repo_id}/{folder} has only pickle weights (not safetensors); "
                                  f"pass --allow-pickle if you trust this model")
            raise ExportError(f"{repo_id}/{folder} has no default or fp16 weights that diffusers "
                              f"loads (.safetensors or .bin); not a usable diffusers model")
        for base, kind in kinds.items():
            if kind[0] == pick if kind else base.endswith((".json", ".txt")):
                chosen.append(f"{folder}/{base}")
    return sorted(chosen)


def _exact(name: str) -> str:
    """An fnmatch pattern (snapshot_download's allow_patterns) that matches only `name`."""
    return re.sub(r"([*?[])", r"[\1]", name)


def load_from_hub(repo_id: str, *, allow_pickle: bool = False, safety: bool = True,
                  variant: str | None = None) -> Components:
    """A hub repo in diffusers layout: lists its files, downloads only those hub_files picks
    (at the listed commit, so the listing and the download agree), loads the folder."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(repo_id)
    except Exception as e:  # requests/httpx and huggingface_hub raise many types
        raise ExportError(f"cannot list the files of {repo_id} on the hub: {_one_line(e)}") from None
    names = [s.rfilename for s in info.siblings or ()]
    files = hub_files(repo_id, names, allow_pickle=allow_pickle, safety=safety, variant=variant)
    try:
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=[_exact(f) for f in files])
    except Exception as e:
        raise ExportError(f"cannot download {repo_id} from the hub: {_one_line(e)}") from None
    chosen = {}  # the variant hub_files picked per component, whatever else the folder holds
    for name in files:
        folder_name, _, base = name.partition("/")
        kind = _weight_kind(base)
        if kind is not None and not kind[1]:
            chosen[folder_name] = kind[0][0]
    return load_diffusers_folder(Path(folder), allow_pickle=allow_pickle, safety=safety,
                                 model_id=repo_id, variants=chosen)

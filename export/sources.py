"""Resolve `--model` to Components: demo, sd14-random, a diffusers folder, a single-file
checkpoint, or a Hugging Face hub id (downloaded only where the hub is reachable).

Every user mistake raises ExportError with one line that says what to do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from export.checks import check_diffusers_folder, model_kind
from export.configs import SD14, ModelConfig
from export.errors import ExportError

if TYPE_CHECKING:
    from export.components import Components


def load_components(model: str, *, allow_pickle: bool = False, safety: bool = True,
                    seed: int = 0) -> Components:
    """Components for a `--model` value (see module doc)."""
    kind = model_kind(model, allow_pickle, safety)
    if kind == "built-in":
        from export.components import build_components

        return build_components(model, seed=seed, safety=safety)
    path = Path(model).expanduser()
    if kind == "folder":
        return load_diffusers_folder(path, allow_pickle=allow_pickle, safety=safety)
    if kind == "file":
        return load_single_file(path, allow_pickle=allow_pickle)
    return load_from_hub(model, allow_pickle=allow_pickle, safety=safety)


def load_diffusers_folder(path: Path, *, allow_pickle: bool = False, safety: bool = True,
                          model_id: str | None = None) -> Components:
    """A diffusers StableDiffusionPipeline folder (model_index.json + component folders)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextModel

    from export.components import Components

    variants, use_checker = check_diffusers_folder(path, allow_pickle, safety)
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


def load_from_hub(repo_id: str, *, allow_pickle: bool = False, safety: bool = True) -> Components:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "*/*.txt", "*/*.json", "*/*.safetensors"]
    if allow_pickle:
        patterns.append("*/*.bin")
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        raise ExportError(f"cannot download {repo_id} from the hub: {_one_line(e)}") from None
    return load_diffusers_folder(Path(folder), allow_pickle=allow_pickle, safety=safety, model_id=repo_id)

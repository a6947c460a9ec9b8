"""The torch modules a bundle is exported from: built from a config (demo, sd14-random)
or loaded from a diffusers folder / single-file checkpoint (see export/sources.py).

`Components` is what `export_bundle` takes and what a test hands to diffusers'
`StableDiffusionPipeline` (with a CLIPTokenizer over the bundle's tokenizer files) to get
the reference pipeline for the same weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

from export.configs import CONFIGS, ModelConfig
from runtime.bundle import SAFETY_CONCEPTS, SAFETY_SPECIAL

EXPORT_DIR = Path(__file__).parent  # ModelConfig.weights are relative to it


@dataclass(frozen=True)
class Components:
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    safety_checker: StableDiffusionSafetyChecker | None
    scheduler: object  # a diffusers scheduler; its save_config() writes scheduler_config.json
    tokenizer_dir: Path | None  # folder with vocab.json + merges.txt; None: CLIP's real vocabulary
    model_id: str  # "demo", "sd14-random", a folder, a file or a hub id (manifest source.model)

    @property
    def hidden(self) -> int:
        return self.text_encoder.config.hidden_size  # C: 768 for v1.x

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)  # 8 for v1.x

    @property
    def default_size(self) -> int:
        """Pixels per side by default: unet sample_size * vae factor, as diffusers does."""
        return self.unet.config.sample_size * self.vae_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
        if self.safety_checker is not None:
            mods["safety_checker"] = self.safety_checker
        return mods


def weights_sha256(components: Components) -> str:
    """sha256 over every module's fp32 state dict, names sorted: the source-weights hash."""
    h = hashlib.sha256()
    for mod_name, mod in sorted(components.modules().items()):
        for name, t in sorted(mod.state_dict().items()):
            h.update(f"{mod_name}.{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().eval()


def build_safety_checker(cfg: ModelConfig, seed: int) -> StableDiffusionSafetyChecker:
    """A random StableDiffusionSafetyChecker whose thresholds never flag an image.

    Concept and special-care embeddings are random (so concept_scores vary with the
    image); every threshold weight is 1.0. A score is cosine(image, concept) - weight,
    and a cosine never exceeds 1, so no score is > 0 and no image is flagged. To exercise
    a host's blackout path, lower the weights (e.g. to -1.0) before exporting.
    """
    config = CLIPConfig(text_config={}, vision_config=cfg.copy("safety_vision"),
                        projection_dim=cfg.safety_projection)
    checker = _seeded(seed, lambda: StableDiffusionSafetyChecker(config))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(SAFETY_CONCEPTS, cfg.safety_projection, generator=g))
        checker.special_care_embeds.copy_(torch.randn(SAFETY_SPECIAL, cfg.safety_projection,
                                                      generator=g))
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    return checker


def build_components(name: str | ModelConfig, seed: int = 0, safety: bool = True) -> Components:
    """Deterministic components for "demo", "sd14-random" or a ModelConfig.

    Each module is built after `torch.manual_seed(seed + k)` (k fixed per module), so
    the same seed gives bit-identical weights on any machine with the same torch. A
    config with `weights` (the demo) then loads its trained text encoder, UNet and VAE
    from that file; the seed still picks the (random) safety checker.
    """
    cfg = CONFIGS[name] if isinstance(name, str) else name
    text = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**cfg.copy("text_encoder"))))
    unet = _seeded(seed + 1, lambda: UNet2DConditionModel(**cfg.copy("unet")))
    vae = _seeded(seed + 2, lambda: AutoencoderKL(**cfg.copy("vae")))
    if cfg.weights is not None:
        from export.demo_model import weights

        weights.load(EXPORT_DIR / cfg.weights, {"text_encoder": text, "unet": unet, "vae": vae})
    checker = build_safety_checker(cfg, seed + 3) if safety else None
    scheduler = PNDMScheduler.from_config(cfg.copy("scheduler"))  # keeps v1-4's clip_sample key
    return Components(text, unet, vae, checker, scheduler, None, cfg.name)

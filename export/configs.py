"""Model configs as data: the tiny `demo` model and the real v1-4 (`sd14-random`).

Each field holds the keyword arguments of one diffusers/transformers config class, so
`UNet2DConditionModel(**cfg.unet)` builds the module. The v1-4 values are those of
CompVis/stable-diffusion-v1-4's `*/config.json` files (text encoder and safety checker:
openai/clip-vit-large-patch14). Treat the dicts as read-only; `ModelConfig.copy()` hands
out fresh ones.

The demo keeps every v1-4 interface (49408-token vocabulary, 77 positions, 4 latent
channels, a 4-block factor-8 VAE, cross-attention, a 17-concept safety checker at CLIP's
224 px input) at tiny widths, so its bundle ships in a few MB; its text encoder, UNet
and VAE were trained on captioned shapes (export/demo_model/), its safety checker is
random and never flags.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from export.clip_vocab import VOCAB_SIZE
from runtime.bundle import (
    LATENT_CHANNELS,
    MAX_TOKENS,
    SAFETY_SIZE,
    VAE_SCALING_FACTOR,
    Profile,
)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    text_encoder: dict  # transformers.CLIPTextConfig kwargs
    unet: dict  # diffusers.UNet2DConditionModel kwargs
    vae: dict  # diffusers.AutoencoderKL kwargs
    safety_vision: dict  # transformers.CLIPVisionConfig kwargs
    safety_projection: int  # CLIPConfig.projection_dim
    scheduler: dict  # diffusers.PNDMScheduler kwargs
    profile: Profile
    # trained weights (export/demo_model/weights.py format), relative to export/; None:
    # random weights from the seed
    weights: str | None = None

    def copy(self, field: str) -> dict:
        return copy.deepcopy(getattr(self, field))


# v1-4's scheduler/scheduler_config.json (PNDMScheduler).
SD14_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1,
    "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon",
    "trained_betas": None,
}

SD14 = ModelConfig(
    name="sd14-random",
    text_encoder={  # openai/clip-vit-large-patch14 text tower: 12 layers x 768, 12 heads
        "vocab_size": VOCAB_SIZE, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1,
    },
    unet={
        "sample_size": 64, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
        "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5,
    },
    vae={
        "sample_size": 512, "in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS,
        "layers_per_block": 2, "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": VAE_SCALING_FACTOR,
    },
    safety_vision={  # CLIP ViT-L/14 vision tower: 24 layers x 1024, 16 heads
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": SAFETY_SIZE, "patch_size": 14,
        "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
    safety_projection=768,
    scheduler=SD14_SCHEDULER,
    profile=Profile(batch=(1, 1, 4), height=(256, 512, 1024), width=(256, 512, 1024)),
)

DEMO = ModelConfig(
    name="demo",
    # trained here on captioned shapes (export/demo_model/): 64x64 pictures, 8x8 latents
    text_encoder={
        # hidden 32: the 49408-token embedding table dominates the shipped bundle's size
        **SD14.text_encoder, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2,
    },
    unet={
        **SD14.unet, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
    },
    vae={
        **SD14.vae, "sample_size": 64, "layers_per_block": 1, "block_out_channels": (16, 32, 32, 32),
        "norm_num_groups": 8,
    },
    safety_vision={
        **SD14.safety_vision, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "patch_size": 32, "projection_dim": 16,
    },
    safety_projection=16,
    scheduler=SD14_SCHEDULER,
    profile=Profile(batch=(1, 1, 4), height=(64, 64, 512), width=(64, 64, 512)),
    weights="demo_model/weights.safetensors",
)

CONFIGS = {c.name: c for c in (DEMO, SD14)}

"""Image post-processing, the safety checker's CLIP preprocessing, and PNG writing.

Both conversions reproduce what diffusers' StableDiffusionPipeline does, so our
pixels and our NSFW flags equal its own:
- postprocess: VaeImageProcessor.postprocess + numpy_to_pil (diffusers/image_processor.py)
- clip_preprocess: CLIPImageProcessor's PIL path as v1-4's feature_extractor is
  configured (transformers/models/clip/image_processing_clip.py): shortest side
  to 224 bicubic, center crop 224, rescale 1/255, normalize with CLIP mean/std.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from runtime.bundle import SAFETY_SIZE

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def postprocess(image: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] float32 in [-1, 1] -> [B, H, W, 3] uint8."""
    x = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # [B, H, W, 3] f32
    return (x * 255).round().astype(np.uint8)


def _resize_shortest(img: Image.Image, size: int) -> Image.Image:
    # transformers' get_resize_output_image_size(default_to_square=False)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC, reducing_gap=None)


def clip_preprocess(images: np.ndarray, size: int = SAFETY_SIZE) -> np.ndarray:
    """[B, H, W, 3] uint8 -> clip_input [B, 3, size, size] float32."""
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, im in enumerate(images):
        x = np.asarray(_resize_shortest(Image.fromarray(im), size))  # [h', w', 3] u8
        top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
        x = x[top:top + size, left:left + size]
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    return out


def png_bytes(image: np.ndarray, metadata: dict[str, str]) -> bytes:
    """[H, W, 3] uint8 -> PNG file contents with `metadata` as tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for k, v in metadata.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()

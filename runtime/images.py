"""Image post-processing, the safety checker's CLIP preprocessing, PNG writing, and the
img2img / inpainting inputs (init image, mask).

Both conversions reproduce what diffusers' StableDiffusionPipeline does, so our
pixels and our NSFW flags equal its own:
- postprocess: VaeImageProcessor.postprocess + numpy_to_pil (diffusers/image_processor.py)
- clip_preprocess: CLIPImageProcessor's PIL path as v1-4's feature_extractor is
  configured (transformers/models/clip/image_processing_clip.py): shortest side
  to 224 bicubic, center crop 224, rescale 1/255, normalize with CLIP mean/std.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from runtime.args import first_line
from runtime.bundle import MAX_SIDE, SAFETY_SIZE, VAE_FACTOR
from runtime.files import read_small

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


# -- img2img and inpainting inputs: diffusers' VaeImageProcessor.preprocess, PIL path -----

MAX_IMAGE_BYTES = 256 << 20  # an init image or mask file (a 8192x8192 PNG is ~200 MB at worst)


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file for --init-image / --mask, decoded to RGB as diffusers' load_image
    does; ValueError with one line when it is not an image, is too large, or PIL cannot
    decode it."""
    try:
        data = read_small(Path(path), MAX_IMAGE_BYTES)  # a regular file
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {first_line(e)}") from None
    return decode_image(data, f"image {path}")


def decode_image(data: bytes, what: str = "image", formats: tuple[str, ...] | None = None,
                 max_side: int = MAX_SIDE) -> Image.Image:
    """An image file's bytes decoded as load_image does (a served request's init image:
    `formats`, the PIL formats taken from the network; `max_side`, its bound)."""
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
        if max(img.size) > max_side:  # before decoding: a decompression bomb costs nothing here
            raise ValueError(f"{img.size[0]}x{img.size[1]} is larger than {max_side} px a side")
        img.load()
        # as diffusers.utils.load_image: the camera's orientation applied, then RGB (a
        # mask too: the mask processor takes its grayscale after resizing)
        return ImageOps.exif_transpose(img).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {what}: not an image format PIL knows") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"cannot read {what}: {first_line(e)}") from None


def as_pil(image: Image.Image | np.ndarray, what: str) -> Image.Image:
    """A PIL image, or a [H, W, 3] / [H, W] uint8 array (0..255; a mask white = 255) as one."""
    if isinstance(image, Image.Image):
        return image
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)):
        raise ValueError(f"{what} must be a PIL image or a uint8 array [H, W, 3] or [H, W], "
                         f"got {a.dtype}{list(a.shape)}")
    if what == "mask" and a.max() == 1:  # would binarize to "keep everything"
        raise ValueError("the mask's values are 0 and 1; give 0 (keep) and 255 (repaint)")
    return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)


def default_size(image: Image.Image) -> tuple[int, int]:
    """(height, width): the image's, rounded down to multiples of 8, as diffusers'
    get_default_height_width (img2img's output size when none is asked for)."""
    w, h = image.size
    return h - h % VAE_FACTOR, w - w % VAE_FACTOR


def resized(image: Image.Image, height: int, width: int) -> Image.Image:
    # VaeImageProcessor.resize, resize_mode "default": Lanczos to exactly (width, height)
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def image_input(image: Image.Image, height: int, width: int) -> np.ndarray:
    """The VAE encoder's input: [1, 3, H, W] float32 in [-1, 1]: VaeImageProcessor's
    Lanczos resize and normalisation of an RGB image (diffusers' img2img fails on other
    modes; they are converted to RGB here first)."""
    if image.mode != "RGB":  # RGBA, L, P: RGB first, so a resize never depends on it
        image = image.convert("RGB")
    x = np.asarray(resized(image, height, width))  # [H, W, 3] uint8
    x = x.astype(np.float32) / np.float32(255.0)  # pil_to_numpy
    return (np.float32(2.0) * x - np.float32(1.0)).transpose(2, 0, 1)[None].copy()  # normalize


def mask_input(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """The inpainting mask: [1, 1, H, W] float32, 1 where to paint (white), 0 where to keep:
    the mask processor's resize (in the mask's own mode, as diffusers), grayscale, /255,
    then binarize at 0.5."""
    x = np.asarray(resized(mask, height, width).convert("L")).astype(np.float32) / np.float32(255.0)
    return (x >= np.float32(0.5)).astype(np.float32)[None, None]

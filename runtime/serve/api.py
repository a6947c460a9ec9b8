"""The two HTTP APIs clients already speak, as request models and their jobs:
AUTOMATIC1111's `/sdapi/v1/txt2img` (the `webuiapi` package, Krita, Open WebUI,
SillyTavern) and OpenAI's `/v1/images/generations` (the `openai` package).

Fields a client sends that change nothing here at their defaults (webuiapi sends ~40)
are accepted; one that asks for a feature we do not have (hires fix, face restore,
tiling, variation seeds, scripts) is refused with one line, never silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from runtime.images import decode_image, resized
from runtime.lora import MAX_SCALE
from runtime.metadata import A1111_SAMPLERS
from runtime.pipeline import UsageError, check_settings, check_text
from runtime.schedulers import SCHEDULERS
from runtime.serve.jobs import Job

# what GET /sdapi/v1/samplers lists beside each A1111 name (k-diffusion's names)
A1111_ALIASES = {"euler_a": ["k_euler_a", "k_euler_ancestral"], "euler": ["k_euler"],
                 "lms": ["k_lms"], "ddim": [], "pndm": ["pndm"], "dpmpp_2m": ["k_dpmpp_2m"],
                 "dpmpp_2m_karras": ["k_dpmpp_2m_ka"]}
# A1111 names, their aliases and our own names (lower case) -> our schedulers
SAMPLER_ALIASES = {
    **{name.lower(): key for key, name in A1111_SAMPLERS.items()},
    **{alias: key for key, aliases in A1111_ALIASES.items() for alias in aliases},
    **{key: key for key in SCHEDULERS},
}


def scheduler_for(sampler: str | None, schedule: str | None = None) -> str:
    """A1111's sampler_name (+ its newer `scheduler` field: Automatic, Karras) or one
    of our names -> our scheduler; UsageError naming the choices otherwise."""
    name = (sampler or "Euler").strip().lower()
    schedule = (schedule or "").strip().lower()
    if schedule == "karras":  # the only sampler we have with Karras sigmas
        if name not in ("dpm++ 2m", "dpm++ 2m karras", "dpmpp_2m", "dpmpp_2m_karras"):
            raise UsageError(f"the Karras schedule is supported with DPM++ 2M only, not {sampler!r}")
        name = "dpm++ 2m karras"
    elif schedule not in ("automatic", ""):
        raise UsageError(f"scheduler {schedule!r} is not supported; use Automatic or Karras")
    if name not in SAMPLER_ALIASES:
        raise UsageError(f"sampler {sampler!r} is not supported; choose one of "
                         f"{', '.join(A1111_SAMPLERS.values())}")
    return SAMPLER_ALIASES[name]


LORA_TAG = re.compile(r"<lora:([^>]*)>")


def lora_tags(prompt: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """A1111's `<lora:name:scale>` tags (scale 1 when left out) taken out of the prompt:
    (the prompt without them, ((name, scale), ...) in prompt order). UsageError for a
    malformed tag or a name that is not a plain file name in the server's LoRA folder."""
    loras = []
    for body in LORA_TAG.findall(prompt):
        parts = body.split(":")
        if len(parts) > 2 or not parts[0].strip():
            raise UsageError(f"<lora:{body}>: only <lora:name> and <lora:name:scale> are supported")
        name = parts[0].strip()
        if name in (".", "..") or any(c in name for c in "/\\\0"):
            raise UsageError(f"<lora:{body}>: the name must be a file name in the LoRA folder")
        try:
            scale = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            raise UsageError(f"<lora:{body}>: the scale {parts[1]!r} is not a number") from None
        if not -MAX_SCALE <= scale <= MAX_SCALE:
            raise UsageError(f"<lora:{body}>: the scale must be in [{-MAX_SCALE:g}, {MAX_SCALE:g}]")
        loras.append((name, scale))
    text = re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip() if loras else prompt
    return text, tuple(loras)


def check_overrides(settings: dict[str, Any], options: dict[str, Any]) -> None:
    """A1111 settings a client sends (override_settings, POST /options): accepted when
    they repeat what GET /options says (the checkpoint by its title or its name), else
    UsageError naming the first other one: this server changes no setting."""
    for key, value in settings.items():
        same = value is None or options.get(key, object()) == value or (  # None: no change
            key == "sd_model_checkpoint" and value == str(options[key]).rsplit(" [", 1)[0])
        if not same:
            raise UsageError(f"setting {key}={repr(value)[:100]} is not supported here (GET "
                             f"/sdapi/v1/options shows what this server has)")


def random_seed() -> int:
    return secrets.randbits(32)  # A1111 draws 32-bit seeds


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a replica (the server's settings)."""

    images: int = 16  # per request (batch_size x n_iter, or n)
    side: int = 1024  # px
    steps: int = 150
    loras: bool = False  # whether <lora:...> tags are taken (the server has a LoRA folder)


MAX_REQUEST_IMAGE_BYTES = 32 << 20  # an init image sent to the server
SERVED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what PIL may open from the network


def init_image(b64: str, width: int, height: int, limits: Limits) -> bytes:
    """A base64 image as clients send it (a data: URL prefix and line breaks accepted, as
    A1111 does), decoded once and resized to width x height here (A1111's resize mode 0;
    the Pipeline's own Lanczos resize, so the same pixels), as the PNG each job carries.
    UsageError with one line."""
    _, _, tail = b64.partition(",") if b64.startswith("data:") else ("", "", b64)
    tail = "".join(tail.split())
    if len(tail) * 3 // 4 > MAX_REQUEST_IMAGE_BYTES:  # before decoding anything
        raise UsageError(f"init_images: more than {MAX_REQUEST_IMAGE_BYTES >> 20} MiB")
    try:
        data = base64.b64decode(tail, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("init_images: not base64") from None
    try:
        img = decode_image(data, "init_images[0]", SERVED_FORMATS, max_side=4 * limits.side)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = io.BytesIO()
    resized(img, height, width).save(out, format="PNG")  # lossless: the pixels as resized
    return out.getvalue()


def make_jobs(prompt: str, negative: str, steps: int, scheduler: str, guidance: float,
              width: int, height: int, seed: int | None, images: int, limits: Limits,
              image_of: Callable[[int, int], tuple[bytes | None, float | None]] | None = None
              ) -> list[Job]:
    """`images` jobs with seeds seed, seed + 1, ... (A1111's all_seeds): each image is
    reproducible alone from its own seed. UsageError for anything the Pipeline would
    refuse without a model, or past the server's limits (one line)."""
    if not 1 <= images <= limits.images:
        raise UsageError(f"{images} images per request; ask for 1 to {limits.images}")
    text, loras = lora_tags(prompt)
    if loras and not limits.loras:
        raise UsageError("this server takes no LoRAs (start it with --lora-dir)")
    if isinstance(steps, int) and steps > limits.steps:
        raise UsageError(f"steps {steps} is more than this server's {limits.steps}")
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, int) and side > limits.side:
            raise UsageError(f"{name} {side} is more than this server's {limits.side} px")
    check_text(text)
    check_text(negative)
    first = random_seed() if seed is None or seed == -1 else seed
    check_settings(steps, scheduler, guidance, 1, first, height, width)
    check_settings(steps, scheduler, guidance, 1, first + images - 1, height, width)
    # the init image last: the cheap checks above refuse a bad request before any decode
    image, strength = image_of(width, height) if image_of is not None else (None, None)
    if image is not None and not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise UsageError(f"denoising_strength must be in (0, 1], got {strength!r}")
    sha = hashlib.sha256(image).hexdigest() if image is not None else ""
    return [Job(text, negative, steps, scheduler, float(guidance), width, height, first + k,
                loras, image, sha, None if image is None else float(strength))  # type: ignore[arg-type]
            for k in range(images)]


class Txt2Img(BaseModel):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionProcessingTxt2Img fields)."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated in A1111; sampler_name wins
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    # features we do not have: accepted only at their defaults (webuiapi sends them all)
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    seed_resize_from_h: int = 0
    seed_resize_from_w: int = 0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    init_images: list[str] | None = None
    refiner_checkpoint: str | None = None
    # k-diffusion's sampler knobs: their defaults are what our samplers do (eta 1: Euler a)
    eta: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None

    takes_images: ClassVar[bool] = False  # init_images: the img2img route's

    def jobs(self, limits: Limits, options: dict[str, Any]) -> list[Job]:
        """`options`: what GET /sdapi/v1/options reports (override_settings may repeat them)."""
        unsupported = [("enable_hr", "hires fix"), ("restore_faces", "face restoration"),
                       ("tiling", "tiling"), ("subseed_strength", "variation seeds"),
                       ("styles", "styles"), ("script_name", "scripts"),
                       ("alwayson_scripts", "scripts"), ("refiner_checkpoint", "refiners"),
                       *(() if self.takes_images else
                         (("init_images", "img2img (this route is txt2img)"),))]
        for name, what in unsupported:
            if getattr(self, name):
                raise UsageError(f"{name}: {what} is not supported by this server")
        for name in ("seed_resize_from_h", "seed_resize_from_w"):  # A1111's "off": -1 or 0
            if getattr(self, name) not in (-1, 0):
                raise UsageError(f"{name}: seed resize is not supported by this server")
        check_overrides(self.override_settings, options)
        scheduler = scheduler_for(self.sampler_name or self.sampler_index, self.scheduler)
        # k-diffusion's knobs at the values our samplers have; eta only where A1111 reads it
        want = {"s_churn": 0.0, "s_tmin": 0.0, "s_noise": 1.0,
                "eta": {"euler_a": 1.0, "ddim": 0.0}.get(scheduler)}
        for name, value in want.items():
            got = getattr(self, name)
            if value is not None and got is not None and got != value:
                raise UsageError(f"{name} {got:g} is not supported with this sampler (it runs "
                                 f"{value:g})")
        if self.s_tmax not in (None, 0.0, float("inf")):
            raise UsageError(f"s_tmax {self.s_tmax} is not supported")
        return make_jobs(self.prompt, self.negative_prompt, self.steps, scheduler,
                         self.cfg_scale, self.width, self.height, self.seed,
                         self.batch_size * self.n_iter, limits,
                         lambda w, h: self._image(w, h, limits))

    def _image(self, width: int, height: int, limits: Limits) -> tuple[bytes | None, float | None]:
        return None, None


class Img2Img(Txt2Img):
    """POST /sdapi/v1/img2img: one init image, resized to width x height (A1111's resize
    mode 0, "just resize"; diffusers' img2img preprocessing), at denoising_strength.
    Inpainting (a mask) is not served yet: refused."""

    takes_images: ClassVar[bool] = True
    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: str | None = None
    include_init_images: bool = False
    initial_noise_multiplier: float | None = None

    def _image(self, width: int, height: int, limits: Limits) -> tuple[bytes | None, float | None]:
        if len(self.init_images) != 1:
            raise UsageError(f"init_images: give one image, got {len(self.init_images)}")
        if self.mask:
            raise UsageError("mask: inpainting is not served yet (python -m runtime.generate "
                             "--mask runs it)")
        if self.resize_mode != 0:
            raise UsageError(f"resize_mode {self.resize_mode} is not supported (only 0: just resize)")
        if self.include_init_images:
            raise UsageError("include_init_images is not supported")
        if self.initial_noise_multiplier not in (None, 1.0):
            raise UsageError(f"initial_noise_multiplier {self.initial_noise_multiplier} is not "
                             f"supported (only 1)")
        return init_image(self.init_images[0], width, height, limits), self.denoising_strength


class ImagesGenerations(BaseModel):
    """POST /v1/images/generations (OpenAI), plus documented extensions: negative_prompt,
    steps, guidance_scale, scheduler, seed (image k gets seed + k)."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None  # "WxH" or "auto": the model's default size
    response_format: str | None = "b64_json"
    quality: str | None = None  # accepted, no effect (one quality here)
    style: str | None = None  # likewise
    user: str | None = None
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "pndm"
    seed: int | None = None

    def jobs(self, default_size: tuple[int, int], limits: Limits) -> list[Job]:
        # `model` is not checked: this server has one, and clients send their own default
        # names ("dall-e-2"); the response is that one model's, as GET /v1/models says
        if self.response_format not in (None, "b64_json"):
            raise UsageError(f"response_format {self.response_format!r} is not supported; "
                             f"use b64_json (this server keeps no image URLs)")
        width, height = default_size
        if self.size not in (None, "auto"):
            try:
                width, height = (int(v) for v in self.size.lower().split("x"))
            except ValueError:
                raise UsageError(f"size must be WIDTHxHEIGHT or auto, got {self.size!r}") from None
        return make_jobs(self.prompt, self.negative_prompt, self.steps,
                         scheduler_for(self.scheduler), self.guidance_scale, width, height,
                         self.seed, self.n, limits)

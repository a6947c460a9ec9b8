"""The text-to-image pipeline: tokenize -> text encoder -> denoise -> VAE -> safety.

Follows diffusers' StableDiffusionPipeline.__call__ step for step (same seeds,
same classifier-free guidance arithmetic, same VAE scaling and post-processing),
so a bundle exported from a diffusers model gives diffusers' pictures.

    pipe = Pipeline("demo")            # load once ...
    result = pipe("a red apple", seed=1)   # ... call many times
    result.images                      # [B, H, W, 3] uint8
    pipe.load_report, result.timings   # what loading and each stage took, as data
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL.Image import Image

from runtime import backends, cache, integrity
from runtime.args import first_line
from runtime.bundle import (
    GRAPH_ORDER,
    INPAINT_CHANNELS,
    LATENT_CHANNELS,
    MAX_BATCH,
    MAX_JSON_BYTES,
    MAX_PROMPT_CHUNKS,
    MAX_SIDE,
    MAX_TOKENS,
    SAFETY_SIZE,
    SCHEDULER_CONFIG,
    TOKENIZER_DIR,
    VAE_FACTOR,
    BundleError,
    Manifest,
    inside,
    integrity_files,
    mismatch,
    read_manifest,
    resolve_model,
)
from runtime.embeddings import Embedding
from runtime.embeddings import expand as expand_words
from runtime.engine import Engine, EngineError, SpecMismatch
from runtime.errors import StageError, UsageError
from runtime.files import read_small
from runtime.images import as_pil, clip_preprocess, default_size, image_input, mask_input, postprocess
from runtime.pipeline_weights import RunTimeWeights
from runtime.prompts import PromptTokens, emphasize, encode_prompt, pad_chunks, parse_weights
from runtime.rng import PerImageGenerators, TorchCPUGenerator
from runtime.safety import flags_from_outputs
from runtime.schedulers import SCHEDULERS, Schedule, make_schedule
from runtime.schedulers._tables import alphas_cumprod
from runtime.schedulers._tables import resolve as resolve_config
from runtime.tokenizer import ClipTokenizer

StepHook = Callable[[int, float, np.ndarray], None]  # (call i, timestep, latents [B, 4, h, w])
Generator = TorchCPUGenerator | PerImageGenerators  # the run's random numbers: one stream, or one per image


@dataclass(frozen=True)
class Request:
    """One generation call's parameters, validated."""

    prompts: tuple[str, ...]  # one per distinct prompt ("" each when prompt_embeds are given)
    negative_prompts: tuple[str, ...]  # same length as prompts
    images_per_prompt: int
    steps: int
    scheduler: str
    guidance_scale: float
    height: int
    width: int
    seed: int  # the whole batch's generator (diffusers' generator=); seeds[0] with seeds
    latents: np.ndarray | None  # [B, 4, h, w] float32, or None to draw from `seed`
    safety: bool
    schedule: Schedule  # the scheduler's tables for these steps
    # the text: A1111 chunks of 77 ids (prompts, then negative prompts with guidance), all
    # at the call's chunk count k, and their emphasis weights; or embeddings given as is
    text_ids: np.ndarray | None = None  # [P, k, 77] int32
    text_weights: np.ndarray | None = None  # [P, k, 77] float32
    dropped: tuple[int, ...] = ()  # per text of text_ids: tokens past the last chunk allowed
    prompt_embeds: np.ndarray | None = None  # [prompts, T, C] float32 (diffusers' prompt_embeds)
    negative_prompt_embeds: np.ndarray | None = None  # [prompts, T, C], with guidance
    # img2img / inpainting: the init image and mask at the output size, the strength, and
    # the first UNet call (diffusers' get_timesteps: strength 0.5 runs about half the calls)
    image: np.ndarray | None = None  # [1, 3, H, W] float32 in [-1, 1]
    mask: np.ndarray | None = None  # [1, 1, H, W] float32: 1 = paint, 0 = keep
    strength: float | None = None
    start: int = 0
    # one generator per image instead of one for the batch: image k then equals the
    # same request alone with seed=seeds[k] (serving batches unrelated requests)
    seeds: tuple[int, ...] | None = None
    vocabulary: int = 0  # the Pipeline's words when text_ids were made (set_embeddings)

    @property
    def batch(self) -> int:  # B: images in this call
        return len(self.prompts) * self.images_per_prompt

    @property
    def cfg(self) -> bool:  # diffusers: do_classifier_free_guidance = guidance_scale > 1
        return self.guidance_scale > 1

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, LATENT_CHANNELS, self.height // VAE_FACTOR, self.width // VAE_FACTOR)

    @property
    def text_tokens(self) -> int:  # T: the UNet's text axis, 77 per chunk
        if self.prompt_embeds is not None:
            return int(self.prompt_embeds.shape[1])
        assert self.text_ids is not None
        return self.text_ids.shape[1] * MAX_TOKENS

    @property
    def unet_calls(self) -> int:  # UNet calls this request runs (per batch)
        return len(self.schedule.timesteps) - self.start

    def image_seed(self, k: int) -> int:
        """The seed that reproduces image k: its own with `seeds`, else the batch's."""
        return self.seeds[k] if self.seeds is not None else self.seed

    @property
    def mode(self) -> str:
        return "inpaint" if self.mask is not None else "img2img" if self.image is not None else "txt2img"


@dataclass
class Result:
    images: np.ndarray  # [B, H, W, 3] uint8; images flagged by the safety checker are black
    nsfw: list[bool]  # per image; all False when the safety checker did not run
    request: Request
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    dropped_tokens: list[int] = field(default_factory=list)  # per prompt, truncation at 77
    dropped_negative_tokens: list[int] = field(default_factory=list)  # per negative prompt (CFG)
    safety_checked: bool = False
    # per UNet call: its seconds (engine.run: copies in, run, copies out), and when the
    # step it belongs to ended (time.perf_counter); [calls] float64 each
    unet_calls: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step_ends: np.ndarray = field(default_factory=lambda: np.zeros(0))
    decoded: np.ndarray | None = None  # [B, H, W, 3] uint8 before the safety checker (keep_decoded)


@dataclass(frozen=True)
class GraphLoad:
    """How one graph's engine was loaded."""

    seconds: float
    cache: str | None  # engine cache: "hit", "built", "rebuilt", "off (...)"; None: no cache
    cuda_graph: str | None  # the UNet on GPU backends: "on", "off", "off (why)"

    def describe(self) -> str:
        notes = ([f"engine cache: {self.cache}"] if self.cache else []) + (
            [f"CUDA graph: {self.cuda_graph}"] if self.cuda_graph else [])
        return f"loaded in {self.seconds:.2f} s" + (f" ({'; '.join(notes)})" if notes else "")


@dataclass
class LoadReport:
    """What loading a bundle chose and cost (the CLI prints it, benchmarks read it)."""

    backend: str = ""
    precision: str = ""
    why: str = ""  # why this backend and precision
    graphs: dict[str, GraphLoad] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)  # auto: the errors fallen back from
    seconds: float = 0.0  # the whole load, manifest to last engine
    check: str = ""  # the bundle files' integrity check: what and how long


def _finite(x: np.ndarray) -> bool:
    """No NaN or inf in x, without allocating: NaN and inf survive a sum. The float32 sum
    (no cast, so no ufunc buffer) can overflow on huge finite values: confirm then."""
    return bool(np.isfinite(x.sum())) or bool(np.isfinite(x).all())


def _check_finite(stage: str, x: np.ndarray) -> None:
    if not _finite(x):
        raise StageError(f"{stage} produced NaN or inf values; the model or its engine is "
                         f"broken for these inputs")


# NaN/inf (an fp16 overflow, a broken engine) is looked for in the UNet's first output,
# then in the latents every CHECK_EVERY calls and after the last: a check right after a
# CPU UNet call costs ~35 us (its code is out of every cache then), and NaN/inf never
# leaves the latents once in, so this stops a bad run within 8 steps at a fifth the cost.
CHECK_EVERY = 8

# Graphs loaded on first use: the VAE encoder (img2img, inpainting), so text-to-image
# never pays its load time or memory (OpenVINO compiles it: ~1 s for v1's encoder).
LATE_GRAPHS = ("vae_encoder",)

MAX_PROMPT_CHARS = 8192  # bounds the bracket parser's work (quadratic in nesting depth)
MAX_GUIDANCE = 1000.0  # far past any useful value; beyond it float32 CFG arithmetic overflows


def check_settings(steps: int, scheduler: str, guidance_scale: float, batch_size: int,
                   seed: int | None, height: int | None = None, width: int | None = None) -> int:
    """Checks that need no model (the CLI runs them before loading one); returns the seed,
    drawn at random when None. Raises UsageError with one line. `height`/`width` None:
    the model's default, checked by `request()`."""
    if scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 <= guidance_scale <= MAX_GUIDANCE:  # NaN fails too
        raise UsageError(f"guidance scale must be >= 0 and <= {MAX_GUIDANCE:g}, got {guidance_scale}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if batch_size > MAX_BATCH:
        raise UsageError(f"{batch_size} images per call is more than {MAX_BATCH}; make several calls")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v % VAE_FACTOR
                              or not VAE_FACTOR <= v <= MAX_SIDE):
            raise UsageError(f"{name} must be a multiple of {VAE_FACTOR} in "
                             f"[{VAE_FACTOR}, {MAX_SIDE}], got {v!r}")
    if seed is None:
        seed = secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise UsageError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


def check_seeds(seeds: Sequence[int], images: int) -> tuple[int, ...]:
    """One seed per image, each as `seed` takes it; UsageError with one line."""
    seeds = tuple(seeds)
    if len(seeds) != images:
        raise UsageError(f"{len(seeds)} seeds for {images} image(s): give one per image")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**64:
            raise UsageError(f"seeds must be integers in [0, 2**64), got {s!r}")
    return tuple(int(s) for s in seeds)


def check_text(text: str) -> None:
    """A prompt must be text the tokenizer can take: a command line with bytes that are
    not UTF-8 (`$'caf\\xe9'`) reaches Python as lone surrogates."""
    if not isinstance(text, str):
        raise UsageError(f"prompts must be strings, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the prompt is not valid UTF-8 text (check the shell's encoding)"
                         ) from None
    if len(text) > MAX_PROMPT_CHARS:  # 8 chunks of 75 tokens are ~3000 characters
        raise UsageError(f"the prompt is {len(text)} characters long, more than "
                         f"{MAX_PROMPT_CHARS}; shorten it")
    try:
        parse_weights(text)  # A1111's syntax: a malformed or absurd weight
    except ValueError as e:
        raise UsageError(f"prompt syntax: {first_line(e)}") from None


def check_latents(latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`latents` as float32 of exactly `shape` [B, 4, h, w], finite; else UsageError."""
    latents = np.asarray(latents)
    if latents.shape != tuple(shape) or not np.issubdtype(latents.dtype, np.floating):
        raise UsageError(f"latents must be a float array of shape {list(shape)}, "
                         f"got {latents.dtype}{list(latents.shape)}")
    with np.errstate(over="ignore"):
        latents = latents.astype(np.float32)
    if not np.isfinite(latents).all():
        raise UsageError("latents contain NaN or inf values (in float32)")
    return latents


@dataclass
class Init:
    """The denoising loop's starting point: latents, and for inpainting the mask and
    masked-image latents (the 9-channel UNet's extra input) or, for a 4-channel UNet,
    the image's latents and the noise the blend after every step re-noises them with."""

    latents: np.ndarray  # [B, 4, h, w] float32
    mask: np.ndarray | None = None  # [B, 1, h, w]: 1 = paint
    masked_latents: np.ndarray | None = None  # [B, 4, h, w]
    image_latents: np.ndarray | None = None  # [B, 4, h, w]; only for the 4-channel blend
    noise: np.ndarray | None = None  # [B, 4, h, w]; likewise


def check_modes(manifest: Manifest, image: bool, mask: bool, latents: bool) -> None:
    """Whether this bundle can run with (or without) an init image and a mask; the CLI
    calls it before loading. UsageError with one line."""
    inpainting = manifest.unet_channels == INPAINT_CHANNELS
    if not image:
        if mask:
            raise UsageError("a mask needs an init image to paint into")
        if inpainting:
            raise UsageError("this is an inpainting model (its UNet takes 9 channels): "
                             "give an init image and a mask")
        return
    if latents:
        raise UsageError("latents cannot be given with an init image (img2img draws them)")
    if "vae_encoder" not in manifest.graphs:
        raise UsageError(f"this bundle has no VAE encoder (format 1.{manifest.format_minor}): "
                         f"img2img and inpainting need a re-export with `python -m export`")
    if inpainting and not mask:
        raise UsageError("this is an inpainting model: give a mask with the init image")


def check_strength(strength: float, steps: int) -> float:
    """img2img's strength in (0, 1], enough for one step: diffusers' get_timesteps runs
    int(steps * strength) steps. UsageError with one line."""
    if (isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating))
            or not 0 < strength <= 1):
        raise UsageError(f"strength must be a number in (0, 1], got {strength!r}")
    if int(steps * strength) < 1:
        raise UsageError(f"strength {strength:g} with {steps} steps leaves no denoising step "
                         f"(int(steps x strength) = 0); raise the strength or the steps")
    return float(strength)


def check_image_size(image: Image) -> Image:
    """An init image of at least 8 px a side (img2img rounds its size down to 8s)."""
    w, h = image.size
    if min(w, h) < VAE_FACTOR:
        raise ValueError(f"the init image is {w}x{h}; it must be at least {VAE_FACTOR} "
                         f"pixels a side")
    return image


class Pipeline(RunTimeWeights):
    """A loaded bundle on one backend; create once, call many times."""

    def __init__(self, model: str | Path = "demo", backend: str = "auto", *,
                 safety: bool = True, use_cache: bool = True, cuda_graph: bool = True,
                 precision: str = "auto", log: Callable[[str], None] | None = None):
        """`cuda_graph`: replay the UNet's run as a CUDA graph captured per shape (tensorrt,
        ort-cuda); off runs it kernel by kernel, for comparison. `precision`: auto, fp32,
        bf16 (openvino; UNet and VAE, the text encoder and safety checker stay fp32) or
        fp16 (GPUs); auto is bf16 on OpenVINO where the CPU runs it natively."""
        self.log = log or (lambda msg: None)
        t0 = time.perf_counter()
        self.bundle = resolve_model(model)
        self.manifest = read_manifest(self.bundle)
        try:
            tries, why = backends.candidates(backend)
            if precision != "auto":  # only the backends that run it
                runs = [b for b in tries if precision in backends.BACKEND_PRECISIONS[b]]
                if runs and len(runs) < len(tries):
                    why += f"; not {', '.join(b for b in tries if b not in runs)}: no {precision} there"
                tries = runs or tries
            backends.resolve_precision(tries[0], precision)  # refuse before loading anything
        except ValueError as e:
            raise UsageError(str(e)) from None
        try:
            config = json.loads(read_small(inside(self.bundle, SCHEDULER_CONFIG), MAX_JSON_BYTES))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
            # StableDiffusionPipeline.__init__ rewrites a deprecated clip_sample=True and any
            # steps_offset != 1 (every scheduler's default is 0): mirror it.
            self.scheduler_config = {**config, "steps_offset": 1}
            if config.get("clip_sample") is True:
                self.scheduler_config["clip_sample"] = False
            # the noise tables every scheduler shares: a bad config fails here, not after
            # every engine has loaded
            try:
                alphas_cumprod(resolve_config(self.scheduler_config, {}))
            except Exception as e:  # anything a hostile config can make numpy raise
                raise ValueError(f"{SCHEDULER_CONFIG}: {first_line(e)}") from None
            for name in ("vocab.json", "merges.txt"):
                inside(self.bundle, TOKENIZER_DIR, name)
            self.tokenizer = self._base_tokenizer = ClipTokenizer(self.bundle / TOKENIZER_DIR)
        except BundleError:
            raise
        except Exception as e:  # OSError, JSON errors; tokenizers raises plain Exception
            raise BundleError(f"corrupt bundle {self.bundle}: {first_line(e)}; "
                              f"re-export it") from None
        names = [n for n in GRAPH_ORDER if n in self.manifest.graphs
                 and (safety or n != "safety_checker") and n not in LATE_GRAPHS]
        self.use_cache = use_cache
        self.loras: list[tuple[Path, float]] = []  # set_loras(): (file, scale), in order
        self._lora_graphs: set[str] = set()  # graphs on a LoRA-ready engine (weights as inputs)
        self._lora_touched: dict[str, set[str]] = {}  # component -> parameters the LoRAs change
        self.embeddings: list[Embedding] = []  # set_embeddings(): textual inversion
        self._table: np.ndarray | None = None  # with embeddings: the token table [V + k, C]
        self._vocabulary = 0  # bumped when the words change: Request.vocabulary must match

        # check the bundle's graph files on a thread beside the engine loads (those changed
        # since they last matched are hashed: xxh3, 0.4 s for a full-size UNet); its verdict
        # is waited for before this returns, so a damaged or edited graph never makes an image
        check = integrity.BundleCheck(integrity_files(self.bundle, self.manifest, names),
                                      cache.verified_memo(self.bundle) if use_cache else None)
        self.load_report = report = LoadReport()

        for i, b in enumerate(tries):
            try:
                self.precision, chose = backends.resolve_precision(b, precision)
            except ValueError as e:
                raise UsageError(str(e)) from None
            bf16 = b == "openvino" and self.precision == "bf16"
            report.why = f"{why}; precision {self.precision} ({chose})" + (
                "; the text encoder and safety checker run fp32" if bf16 else "")
            self.log(f"backend: {b} ({report.why})")
            report.graphs = {}
            try:
                self.engine_set = backends.EngineSet(b, self.manifest, self.bundle, names,
                                                     use_cache, self._loaded, cuda_graph,
                                                     self.precision)
                break
            except EngineError as e:
                self._checked(check)  # a damaged bundle graph: reported, not fallen back from
                self._damaged(e, b, last=i + 1 == len(tries))  # not its spec: reported too
                if i + 1 == len(tries):
                    raise
                report.fallbacks.append(str(e))
                self.log(f"{e}; falling back to {tries[i + 1]}")  # auto only
        try:
            self._checked(check)
        except BaseException:
            self.close()
            raise
        report.check = check.describe()
        self.log(f"bundle check: {report.check}")
        self.backend = b
        report.backend, report.precision = b, self.precision
        report.seconds = self.load_seconds = time.perf_counter() - t0

    def _loaded(self, name: str, engine: Engine, seconds: float) -> None:
        graph = None
        if name == "unet" and engine.backend in ("tensorrt", "ort-cuda"):
            graph = getattr(engine, "cuda_graph_status", None) or (
                "on" if getattr(engine, "cuda_graph", False) else "off")
        self.load_report.graphs[name] = GraphLoad(seconds, engine.cache_status, graph)
        self.log(f"{name}: {self.load_report.graphs[name].describe()}")

    def _load_late(self, name: str) -> None:
        """Load a LATE_GRAPHS engine on first use, its files checked as at load (a
        damaged graph: BundleError; a backend that cannot run it: EngineError)."""
        if name in self.engines:
            return
        if not self.engines:
            raise UsageError("this Pipeline is closed")
        check = integrity.BundleCheck(integrity_files(self.bundle, self.manifest, [name]),
                                      cache.verified_memo(self.bundle) if self.use_cache else None)
        t = time.perf_counter()
        try:
            self.engine_set.add(name, self.manifest, self.bundle, self._loaded)
        except EngineError as e:
            self._checked(check)
            self._damaged(e, self.backend, last=True)
            raise
        try:
            self._checked(check)
        except BaseException:
            self.engines.pop(name).release()
            self.load_report.graphs.pop(name, None)
            raise
        self.load_report.seconds += time.perf_counter() - t  # what loading has cost in all
        self.log(f"{name} bundle check: {check.describe()}")

    def _checked(self, check: integrity.BundleCheck) -> None:
        """Wait for the bundle check; BundleError when a file is damaged or unreadable."""
        try:
            bad = check.result()
        except OSError as e:
            raise BundleError(f"cannot read bundle {self.bundle}: {first_line(e)}") from None
        if bad is not None:
            raise mismatch(bad)

    def _damaged(self, e: EngineError, backend: str, last: bool = False) -> None:
        """Raise when a load failed because a file is damaged, rather than fall back: a
        bundle graph that is corrupt (BundleError: another backend would fail on it too,
        or run it wrongly), or a cached artifact whose tensors are not the graph's. And
        when the `last` backend to try cannot read a bundle graph that matches its hash
        (e.g. its external data points outside the bundle, which the backends refuse):
        a bundle this runtime cannot use, BundleError too."""
        graph = self.manifest.graphs.get(e.graph or "")
        in_bundle = (graph is not None and e.source is not None
                     and e.source.resolve() == (self.bundle / graph.file).resolve())
        if in_bundle and isinstance(e, SpecMismatch):
            raise BundleError(f"corrupt bundle {self.bundle}: {e}; re-export it") from None
        if in_bundle and e.unreadable and last:
            raise BundleError(f"{e}; the bundle's graph matches its manifest but cannot be "
                              f"loaded: re-export the bundle") from None
        if not in_bundle and isinstance(e, SpecMismatch):  # a cached plan or graph
            raise EngineError(f"{e}: a damaged engine cache entry; rebuild it with `python -m "
                              f"engines.build {self.bundle} --backend {backend} --force`"
                              ) from None

    @property
    def engines(self) -> dict[str, Engine]:
        """Loaded engines by graph name (empty after close())."""
        return self.engine_set.engines

    @property
    def has_safety_checker(self) -> bool:
        return "safety_checker" in self.engines

    def close(self) -> None:
        self.engine_set.release()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation -------------------------------------------------------------------

    def request(self, prompt: str | Sequence[str] | None = None,
                negative_prompt: str | Sequence[str] | None = None,
                *, steps: int = 50, scheduler: str = "pndm", guidance_scale: float = 7.5,
                height: int | None = None, width: int | None = None, batch_size: int = 1,
                seed: int | None = None, seeds: Sequence[int] | None = None,
                latents: np.ndarray | None = None,
                safety: bool | None = None, image: Image | np.ndarray | None = None,
                mask: Image | np.ndarray | None = None, strength: float | None = None,
                prompt_embeds: np.ndarray | None = None,
                negative_prompt_embeds: np.ndarray | None = None) -> Request:
        """Validate parameters against the bundle; raise UsageError with one line.

        Prompts take A1111's syntax: `(word)` x1.1, `[word]` /1.1, `(word:1.3)`, `BREAK`,
        and any length (77 tokens a chunk; runtime/prompts.py). Or give `prompt_embeds`
        [prompts, T, C] (and `negative_prompt_embeds`) as diffusers takes them; or a text
        prompt with `negative_prompt_embeds` in its own shape [prompts, 77k, C].
        `image` (a PIL image or [H, W, 3] uint8): img2img from it at `strength` (default
        0.8), the output at its size rounded down to multiples of 8 unless height/width are
        given; with `mask` (white = repaint): inpainting, strength default 1.0, output at
        the model's default size unless given, as diffusers' pipelines do.
        `seeds`: one per image (instead of `seed`): image k is then the image this request
        gives alone with seed=seeds[k], whatever else is in the batch."""
        m = self.manifest
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise UsageError("pass a negative prompt or negative_prompt_embeds, not both")
        if prompt_embeds is not None:
            if prompt is not None:
                raise UsageError("pass a prompt or prompt_embeds, not both")
            prompt_embeds = self._check_embeds("prompt_embeds", prompt_embeds, None)
            prompts: tuple[str, ...] = ("",) * len(prompt_embeds)
        else:
            prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt or ())
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise UsageError("prompt must be a string or a non-empty list of strings")
        neg = negative_prompt if negative_prompt is not None else ""
        for text in (*prompts, *((neg,) if isinstance(neg, str) else neg)):
            check_text(text)
        negs = (neg,) * len(prompts) if isinstance(neg, str) else tuple(neg)
        if len(negs) != len(prompts):
            raise UsageError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
        pil, pil_mask = self._check_images(image, mask, latents)
        if pil is not None and pil_mask is None:  # img2img: the image's size (diffusers'
            h, w = default_size(pil)  # get_default_height_width), for a side not given
            height, width = h if height is None else height, w if width is None else width
        height = m.default_height if height is None else height
        width = m.default_width if width is None else width
        if seeds is not None and (seed is not None or latents is not None):
            raise UsageError("pass seeds (one per image) or seed/latents, not both")
        seed = check_settings(steps, scheduler, guidance_scale, batch_size,
                              seed if seeds is None else 0, height, width)
        b = len(prompts) * batch_size
        if b > MAX_BATCH:
            raise UsageError(f"{b} images per call is more than {MAX_BATCH}; make several calls")
        if seeds is not None:
            seeds = check_seeds(seeds, b)
            seed = seeds[0]
        schedule = self._schedule(scheduler, steps)
        safety = self.has_safety_checker if safety is None else safety
        if safety and not self.has_safety_checker:
            safety = False  # the bundle has none, or it was not loaded
        cfg = guidance_scale > 1
        cond: dict = {}
        if prompt_embeds is not None:
            cond["prompt_embeds"] = prompt_embeds
            if negative_prompt_embeds is not None:
                cond["negative_prompt_embeds"] = self._check_embeds(
                    "negative_prompt_embeds", negative_prompt_embeds, prompt_embeds.shape)
            if cfg and negative_prompt_embeds is None and prompt_embeds.shape[1] % MAX_TOKENS:
                raise UsageError("prompt_embeds whose length is not a multiple of 77 need "
                                 "negative_prompt_embeds of the same shape (with guidance)")
        elif negative_prompt_embeds is not None:  # a text prompt, the negative side given
            cond.update(self._tokens(prompts, None))  # [P, k, 77]
            if cfg:  # as diffusers: the same shape as the prompt's embeddings
                k = cond["text_ids"].shape[1]
                cond["negative_prompt_embeds"] = self._check_embeds(
                    f"negative_prompt_embeds (the prompt's {k} chunk(s) of 77 tokens)",
                    negative_prompt_embeds, (len(prompts), k * MAX_TOKENS, m.hidden))
        else:
            cond.update(self._tokens(prompts + (negs if cfg else ()), None))
        if prompt_embeds is not None and cfg and negative_prompt_embeds is None:
            # negative prompts at the embeds' length
            cond.update(self._tokens(negs, prompt_embeds.shape[1] // MAX_TOKENS))
            if cond["text_ids"].shape[1] * MAX_TOKENS != prompt_embeds.shape[1]:
                raise UsageError(f"the negative prompt is longer than prompt_embeds' "
                                 f"{prompt_embeds.shape[1]} tokens; pass negative_prompt_embeds")
        req = Request(prompts, negs, batch_size, steps, scheduler, float(guidance_scale),
                      height, width, seed, None, safety, schedule, **cond,
                      seeds=None if seeds is None else tuple(seeds))
        if latents is not None:
            req = replace(req, latents=check_latents(latents, req.latent_shape))
        if pil is not None:
            req = self._with_images(req, pil, pil_mask, strength)
        elif strength is not None:
            raise UsageError("strength needs an init image (img2img or inpainting)")
        self._check_profiles(req)  # the graphs loaded; then the VAE encoder, on first use
        if req.image is not None and "vae_encoder" not in self.engines:
            self._load_late("vae_encoder")
            self._check_profiles(req)
        return req

    def _check_embeds(self, what: str, x: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
        """prompt_embeds-like input as float32 [P, T, C], finite; `shape` to match exactly."""
        x = np.asarray(x)
        c, top = self.manifest.hidden, MAX_PROMPT_CHUNKS * MAX_TOKENS
        ok = (x.ndim == 3 and np.issubdtype(x.dtype, np.floating) and 1 <= x.shape[0] <= MAX_BATCH
              and 1 <= x.shape[1] <= top and x.shape[2] == c)
        if not ok or (shape is not None and x.shape != shape):
            want = list(shape) if shape is not None else f"[prompts, tokens <= {top}, {c}]"
            raise UsageError(f"{what} must be a float array of shape {want}, "
                             f"got {x.dtype}{list(x.shape)}")
        if self.manifest.max_text_tokens not in (None, x.shape[1]):
            raise UsageError(f"{what}: this bundle's UNet takes exactly {MAX_TOKENS} tokens "
                             f"(exported before long prompts); re-export it")
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise UsageError(f"{what} contain NaN or inf values (in float32)")
        return x

    def _tokens(self, texts: tuple[str, ...], pad_to: int | None) -> dict:
        """A1111 chunks of every text at one chunk count (the longest text's; `pad_to`
        at least: the prompt_embeds' when only negative prompts are encoded here)."""
        top = MAX_PROMPT_CHUNKS if self.manifest.max_text_tokens is None else 1
        try:
            empty = encode_prompt(self.tokenizer, "", 1)
            texts = tuple(expand_words(t, self.embeddings) for t in texts)  # multi-vector words
            encoded = [encode_prompt(self.tokenizer, t, top, chunked=top > 1) for t in texts]
            # one more row of `pad_to` empty chunks sets the least chunk count; cut below
            ids, weights = pad_chunks(encoded + [PromptTokens(
                np.repeat(empty.ids, pad_to or 1, 0), np.repeat(empty.weights, pad_to or 1, 0), 0)],
                empty)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return {"text_ids": ids[:-1], "text_weights": weights[:-1],
                "dropped": tuple(p.dropped for p in encoded), "vocabulary": self._vocabulary}

    def _check_images(self, image, mask, latents) -> tuple[Image | None, Image | None]:
        """The init image and mask as PIL images, and what this bundle can do with them."""
        check_modes(self.manifest, image is not None, mask is not None, latents is not None)
        if image is None:
            return None, None
        try:
            pil = as_pil(image, "image")
            return check_image_size(pil), (None if mask is None else as_pil(mask, "mask"))
        except ValueError as e:
            raise UsageError(str(e)) from None

    def _with_images(self, req: Request, image: Image, mask: Image | None,
                     strength: float | None) -> Request:
        """`req` with the preprocessed image (and mask), strength and first UNet call."""
        strength = check_strength((1.0 if mask is not None else 0.8) if strength is None
                                  else strength, req.steps)
        try:
            start = req.schedule.start_index(strength)
        except ValueError as e:  # a schedule that cannot start part-way (PNDM's PRK steps)
            raise UsageError(f"scheduler {req.scheduler}: {first_line(e)}") from None
        if start >= len(req.schedule.timesteps):
            raise UsageError(f"strength {strength:g} with {req.steps} steps leaves no denoising "
                             f"step; raise the strength or the steps")
        h, w = req.height, req.width
        return replace(req, image=image_input(image, h, w),
                       mask=None if mask is None else mask_input(mask, h, w),
                       strength=float(strength), start=start)

    def graph_shapes(self, req: Request) -> dict[str, dict[str, tuple[int, ...]]]:
        """The input shapes each graph runs at for `req` (what the stages allocate)."""
        b, (_, c, h, w) = req.batch, req.latent_shape
        n = 2 * b if req.cfg else b  # UNet batch: [uncond; cond] with guidance
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        if req.text_ids is not None:  # one call per chunk: [P, 77], prompts then negatives
            shapes["text_encoder"] = {"input_ids": (len(req.text_ids), MAX_TOKENS)}
        shapes["unet"] = {"sample": (n, self.manifest.unet_channels, h, w), "timestep": (1,),
                          "encoder_hidden_states": (n, req.text_tokens, self.manifest.hidden)}
        shapes["vae_decoder"] = {"latent": (b, c, h, w)}
        if req.image is not None:  # the init image (and the masked image), one at a time
            shapes["vae_encoder"] = {"image": (1, 3, req.height, req.width)}
        if req.safety:
            shapes["safety_checker"] = {"clip_input": (b, 3, SAFETY_SIZE, SAFETY_SIZE)}
        return shapes

    def _check_profiles(self, req: Request) -> None:
        """Only engines built for a shape profile (TensorRT plans) limit sizes and batch;
        refuse what none of their plans covers, before any work, naming the rebuild."""
        for name, shapes in self.graph_shapes(req).items():
            engine = self.engines.get(name)
            why = engine.refuses(shapes) if engine is not None else None  # None: closed
            if why:
                prof = self.manifest.profile
                side = max(req.height, req.width, prof.height[2], prof.width[2])
                small = min(req.height, req.width, prof.height[0], prof.width[0])
                tokens = max(-(-req.text_tokens // MAX_TOKENS) * MAX_TOKENS, prof.tokens[2])
                raise UsageError(
                    f"{self.backend}: {req.height}x{req.width}, {req.batch} image(s) per call, "
                    f"{req.text_tokens} text tokens: "
                    f"{why}; build plans that cover it with `python -m engines.build "
                    f"{shlex.quote(str(self.bundle))} --backend {self.backend} --min-size {small} --max-size "
                    f"{side} --max-batch {max(req.batch, prof.batch[2])}"
                    f"{'' if self.manifest.max_text_tokens else f' --max-tokens {tokens}'}`")

    def _schedule(self, scheduler: str, steps: int) -> Schedule:
        """The scheduler's frozen tables, built before any work so bad settings fail early."""
        try:
            limit = int(self.scheduler_config.get("num_train_timesteps", 1000))
        except (TypeError, ValueError):
            limit = 1000
        if steps > limit:
            raise UsageError(f"steps must be at most {limit} (the model's training timesteps), "
                             f"got {steps}")
        try:
            return make_schedule(scheduler, self.scheduler_config, steps)
        except Exception as e:  # a config the shared check passed but this scheduler cannot use
            raise UsageError(f"scheduler {scheduler} cannot run {steps} steps with this model's "
                             f"scheduler_config.json: {e}") from None

    # -- generation -------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str] | None = None,
                 negative_prompt: str | Sequence[str] | None = None, *,
                 progress: Callable[[int, int], None] | None = None,
                 on_step_end: StepHook | None = None, keep_decoded: bool = False,
                 **kwargs) -> Result:
        """Generate images; kwargs as in `request()`. `progress(i, calls)` after each UNet
        call. `on_step_end(i, t, latents)` after each scheduler step, as diffusers'
        callback_on_step_end: call i (0-based), its timestep, the latents [B, 4, h, w]
        float32, which it may change in place (a reused buffer: copy to keep). The loop's
        timings are in the Result. `keep_decoded`: also return the decoder's images
        before the safety checker."""
        return self.run(self.request(prompt, negative_prompt, **kwargs), progress, keep_decoded,
                        on_step_end)

    def run(self, req: Request, progress: Callable[[int, int], None] | None = None,
            keep_decoded: bool = False, on_step_end: StepHook | None = None) -> Result:
        if req.text_ids is not None and req.vocabulary != self._vocabulary:
            raise UsageError("this request's prompts were tokenized before the embeddings "
                             "changed (set_embeddings); make the request again")
        if req.image is not None:  # request() did; a Request may come from elsewhere
            self._load_late("vae_encoder")
        self._check_profiles(req)  # likewise
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        t = time.perf_counter()
        cond, uncond = self._encode(req)  # [B, T, C] each (uncond None without CFG)
        timings["text_encoder"] = time.perf_counter() - t

        rng = PerImageGenerators(req.seeds) if req.seeds is not None else TorchCPUGenerator(req.seed)
        t = time.perf_counter()
        init = self._init_latents(req, rng)  # img2img / inpainting: draws from rng first
        if req.image is not None:
            timings["vae_encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        latents, unet_calls, step_ends = self._denoise(req, cond, uncond, init, rng, progress,
                                                       on_step_end)  # [B, 4, h, w]
        timings["denoise"] = time.perf_counter() - t
        timings["unet"] = float(unet_calls.sum())

        t = time.perf_counter()
        image = self._decode(req, latents)  # [B, 3, H, W] in [-1, 1]
        images = postprocess(image)  # [B, H, W, 3] uint8
        timings["vae_decoder"] = time.perf_counter() - t
        decoded = images.copy() if keep_decoded else None

        nsfw = [False] * req.batch
        if req.safety:
            t = time.perf_counter()
            nsfw = self._safety(images)
            images[np.asarray(nsfw)] = 0  # diffusers: flagged images become black
            timings["safety_checker"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        n = len(req.prompts) if req.prompt_embeds is None else 0  # texts encoded: prompts first
        return Result(images, nsfw, req, timings, dropped_tokens=list(req.dropped[:n]),
                      dropped_negative_tokens=list(req.dropped[n:]), safety_checked=req.safety,
                      unet_calls=unet_calls, step_ends=step_ends, decoded=decoded)

    def _text_hidden(self, req: Request) -> np.ndarray:
        """The text encoder's output for every text of `req.text_ids`, its chunks side by
        side with their emphasis applied: [P, 77k, C]. One call per chunk ([P, 77] ids)
        keeps the encoder's batch what a short prompt gives (its engine's profile)."""
        ids, weights = req.text_ids, req.text_weights  # [P, k, 77]
        assert ids is not None and weights is not None
        p, k, _ = ids.shape
        enc = self.engines["text_encoder"]
        enc.allocate({"input_ids": (p, MAX_TOKENS)})
        hidden = np.empty((p, k * MAX_TOKENS, self.manifest.hidden), np.float32)  # [P, 77k, C]
        for j in range(k):
            out = enc.run({"input_ids": np.ascontiguousarray(ids[:, j])})["last_hidden_state"]
            # a chunk whose weights are all 1 comes back bit for bit (plain prompts = diffusers)
            hidden[:, j * MAX_TOKENS:(j + 1) * MAX_TOKENS] = emphasize(out, weights[:, j])
        _check_finite("text encoder", hidden)
        return hidden

    def _encode(self, req: Request) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt (and negative prompt) embeddings, each repeated per image: [B, T, C]."""
        hidden = self._text_hidden(req) if req.text_ids is not None else None
        n, k = len(req.prompts), req.images_per_prompt
        if req.prompt_embeds is not None:
            prompts, negatives = req.prompt_embeds, hidden
        else:
            assert hidden is not None
            prompts, negatives = hidden[:n], hidden[n:]
        if req.negative_prompt_embeds is not None:
            negatives = req.negative_prompt_embeds
        cond = np.repeat(prompts, k, axis=0)  # diffusers repeats each prompt k times in a row
        if not req.cfg:
            return cond, None
        assert negatives is not None  # request(): encoded, or given, whenever cfg
        return cond, np.repeat(negatives, k, axis=0)

    def _encode_image(self, image: np.ndarray, rng: Generator, batch: int) -> np.ndarray:
        """diffusers' `scaling_factor * vae.encode(image).latent_dist.sample(generator)`:
        [1, 3, H, W] in [-1, 1] -> [B, 4, h, w]: one [1, 4, h, w] draw from a batch
        generator, repeated (diffusers); one per image from per-image generators."""
        vae = self.engines["vae_encoder"]
        vae.allocate({"image": image.shape})
        params = vae.run({"image": image})["latent_parameters"]  # [1, 8, h, w]
        _check_finite("vae encoder", params)
        mean, logvar = params[:, :LATENT_CHANNELS], params[:, LATENT_CHANNELS:]
        std = np.exp(np.float32(0.5) * np.clip(logvar, np.float32(-30.0), np.float32(20.0)))
        per_image = isinstance(rng, PerImageGenerators)
        drawn = rng.randn((batch if per_image else 1, *mean.shape[1:]))
        sample = mean + std * drawn  # DiagonalGaussianDistribution.sample
        sample = (np.float32(self.manifest.vae_scaling_factor) * sample).astype(np.float32)
        return sample if per_image else np.repeat(sample, batch, axis=0)

    def _init_latents(self, req: Request, rng: Generator) -> Init:
        """The starting latents and, for inpainting, what every step needs, drawing from
        rng in diffusers' order: the image's latent sample, the noise, the masked image's."""
        shape, sched = req.latent_shape, req.schedule
        latents = np.empty(shape, np.float32)  # [B, 4, h, w], updated in place every step
        if req.image is None:  # diffusers' prepare_latents: one randn over the whole batch
            drawn = req.latents if req.latents is not None else rng.randn(shape)
            np.multiply(drawn, np.float32(sched.init_noise_sigma), out=latents)
            return Init(latents)
        inpaint = req.mask is not None
        nine = self.manifest.unet_channels == INPAINT_CHANNELS
        pure = inpaint and req.strength == 1.0  # inpainting from pure noise (is_strength_max)
        image_latents = None
        if not pure or not nine:  # the 4-channel blend needs the image's latents always
            image_latents = self._encode_image(req.image, rng, shape[0])
        noise = rng.randn(shape)  # [B, 4, h, w]
        if pure:
            np.multiply(noise, np.float32(sched.init_noise_sigma), out=latents)
        else:
            assert image_latents is not None
            sched.add_noise(image_latents, noise, req.start, out=latents)
        if not inpaint:
            return Init(latents)
        assert req.mask is not None
        masked = self._encode_image(req.image * (req.mask < 0.5), rng, shape[0])  # [B, 4, h, w]
        # the mask at latent size: interpolate(mode="nearest") by 8 takes every 8th pixel
        small = req.mask[:, :, ::VAE_FACTOR, ::VAE_FACTOR]  # [1, 1, h, w]
        blend = None if nine else (image_latents, noise)  # a 4-channel UNet's blend
        return Init(latents, np.repeat(small, shape[0], 0), masked,
                    *(blend or (None, None)))

    def _denoise(self, req: Request, cond: np.ndarray, uncond: np.ndarray | None, init: Init,
                 rng: Generator, progress: Callable[[int, int], None] | None,
                 on_step_end: StepHook | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(final latents [B, 4, h, w], seconds of each UNet call, when each step ended).
        Everything the loop touches is allocated before it: the loop allocates nothing.
        The latents may be a view of the UNet input (`sample[:B]`, for schedulers that do
        not scale it), which on_step_end hooks see and may change like any latents."""
        sched, start = req.schedule, req.start
        latents, b, shape = init.latents, req.batch, req.latent_shape
        state = sched.new_state(shape, rng, start)  # after the draws: Euler a continues rng

        unet = self.engines["unet"]
        unet_shapes = self.graph_shapes(req)["unet"]
        unet.allocate(unet_shapes)
        n = unet_shapes["sample"][0]  # UNet batch: [uncond; cond] with guidance, 2B
        unet.set_constant("encoder_hidden_states",
                          np.concatenate([uncond, cond]) if req.cfg else cond)  # [N, T, C]
        sample = np.empty(unet_shapes["sample"], np.float32)  # [N, U, h, w]
        if sample.shape[1] == INPAINT_CHANNELS:  # [latents, mask, masked-image latents]
            assert init.mask is not None and init.masked_latents is not None
            for half in range(n // b):  # the same mask and masked image for both CFG halves
                sample[half * b:(half + 1) * b, LATENT_CHANNELS] = init.mask[:, 0]
                sample[half * b:(half + 1) * b, LATENT_CHANNELS + 1:] = init.masked_latents
        # [B, 4, h, w] views: the uncond and cond halves' latent channels
        first, second = sample[:b, :LATENT_CHANNELS], sample[b:, :LATENT_CHANNELS]
        if not sched.scales_input and sample.shape[1] == LATENT_CHANNELS:
            # the latents live where the UNet reads them: the step writes its input, and
            # the loop touches one buffer fewer after the UNet has swept the caches
            np.copyto(first, latents)
            latents = first
        blend = init.image_latents is not None  # 4-channel inpainting (Init says)
        if blend:
            assert init.mask is not None and init.image_latents is not None and init.noise is not None
            # the mask over all 4 channels: a [B, 1, h, w] operand would make numpy
            # allocate a broadcast temporary every step
            paint = np.repeat(init.mask, LATENT_CHANNELS, axis=1)  # [B, 4, h, w]
            keep = np.float32(1.0) - paint
            renoised, scratch = np.empty(shape, np.float32), np.empty(shape, np.float32)
            image_latents, image_noise = init.image_latents, init.noise
        timestep = np.empty((1,), np.float32)
        feeds = {"sample": sample, "timestep": timestep}
        g = np.float32(req.guidance_scale)
        total = len(sched.timesteps)
        calls = total - start
        unet_calls, step_ends = np.zeros(calls), np.zeros(calls)
        # inf/NaN from a broken engine is reported by the checks below, not as numpy warnings
        with np.errstate(over="ignore", invalid="ignore"):
            for c, i in enumerate(range(start, total)):  # c: this run's call, i: the schedule's
                x = sched.scale_model_input(latents, i, first)  # into the UNet's input, or latents
                if x is not first:
                    np.copyto(first, x)
                if req.cfg:
                    np.copyto(second, first)
                timestep[0] = sched.timesteps[i]
                t0 = time.perf_counter()
                noise = unet.run(feeds)["noise_pred"]  # [N, 4, h, w]
                unet_calls[c] = time.perf_counter() - t0
                if req.cfg:  # uncond + g * (cond - uncond), in diffusers' order of operations
                    # into the scheduler's history slot (PNDM), else into the UNet input's
                    # second half, free until the loop's next copy into it: fewer cold
                    # buffers to touch after the UNet has swept the caches
                    dest = sched.output_buffer(state, i)
                    if dest is None:
                        dest = second
                    np.subtract(noise[b:], noise[:b], out=dest)
                    dest *= g
                    dest += noise[:b]
                    noise = dest  # NaN/inf in either half stays NaN/inf here
                if c == 0:  # a broken engine shows at once, named; later, the latents below
                    _check_finite(f"unet (step 1 of {calls}, timestep {sched.timesteps[i]:g})", noise)
                sched.step(state, i, noise, latents, rng, out=latents)
                if blend:  # (1 - mask) * image latents noised to the next step + mask * latents
                    proper = image_latents
                    if i + 1 < total:
                        proper = sched.add_noise(image_latents, image_noise, i + 1,
                                                 out=renoised, scratch=scratch)
                    latents *= paint
                    np.multiply(proper, keep, out=scratch)
                    np.add(scratch, latents, out=latents)
                if (c + 1) % CHECK_EVERY == 0 or c + 1 == calls:
                    lo = c // CHECK_EVERY * CHECK_EVERY + 1  # the first step since the last check
                    _check_finite(f"unet or scheduler (steps {lo} to {c + 1} of {calls})", latents)
                step_ends[c] = time.perf_counter()
                if on_step_end is not None:
                    on_step_end(c, float(sched.timesteps[i]), latents)
                if progress is not None:
                    progress(c + 1, calls)
        return latents, unet_calls, step_ends

    def _decode(self, req: Request, latents: np.ndarray) -> np.ndarray:
        vae = self.engines["vae_decoder"]
        vae.allocate(self.graph_shapes(req)["vae_decoder"])
        scaled = (latents / np.float32(self.manifest.vae_scaling_factor)).astype(np.float32)
        image = vae.run({"latent": scaled})["image"].copy()  # [B, 3, H, W]
        _check_finite("vae decoder", image)
        return image

    def _safety(self, images: np.ndarray) -> list[bool]:
        checker = self.engines["safety_checker"]
        clip_input = clip_preprocess(images)  # [B, 3, 224, 224]
        checker.allocate({"clip_input": clip_input.shape})
        return flags_from_outputs(checker.run({"clip_input": clip_input}))


def generate(prompt: str | Sequence[str], model: str | Path = "demo", backend: str = "auto",
             **kwargs) -> Result:
    """One-shot convenience: load `model`, generate, release. See Pipeline.request for kwargs."""
    with Pipeline(model, backend, safety=kwargs.get("safety", True) is not False) as pipe:
        return pipe(prompt, **kwargs)

"""`python -m runtime.generate "prompt"`: text (and an image) to PNG files, from the command line.

Prompts take AUTOMATIC1111's syntax and any length: `(word)` x1.1, `[word]` /1.1,
`(word:1.3)`, `BREAK`. `--init-image FILE --strength S` runs img2img; add `--mask FILE`
(white = repaint) for inpainting. PNGs carry A1111's `parameters` text.

Bad input exits 2 with one line on stderr and writes nothing; a failing engine or
stage exits 1 with one line. PNGs never overwrite existing files.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL.Image import Image

from runtime.args import OneLineParser, first_line
from runtime.backends import BACKENDS, PRECISIONS, for_run_time_weights
from runtime.bundle import (
    LATENT_CHANNELS,
    MAX_PROMPT_CHUNKS,
    TOKENIZER_DIR,
    VAE_FACTOR,
    BundleError,
    Manifest,
    read_manifest,
    resolve_model,
)
from runtime.engine import EngineError
from runtime.files import read_small, why_not_creatable, write_all_new
from runtime.images import load_image, png_bytes
from runtime.integrity import file_hashes
from runtime.lora import LoraError, parse_lora_arg
from runtime.lora_apply import missing_support, read_loras
from runtime.metadata import A1111_SAMPLERS, parameters_text
from runtime.pipeline import (
    Pipeline,
    Result,
    StageError,
    UsageError,
    check_image_size,
    check_latents,
    check_modes,
    check_seeds,
    check_settings,
    check_strength,
    check_text,
)
from runtime.pipeline_weights import read_embeddings
from runtime.schedulers import SCHEDULERS
from runtime.tokenizer import ClipTokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m runtime.generate", description=__doc__.splitlines()[0])
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", default="demo", help="bundle folder, or `demo` (built in)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 on OpenVINO where the CPU has bf16 units, fp32 on other "
                        "CPUs, fp16 on GPUs")
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="pndm", help=f"one of {', '.join(SCHEDULERS)}")
    p.add_argument("--guidance-scale", type=float, default=7.5,
                   help="classifier-free guidance; <= 1 runs the UNet once per step")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 8 (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1, help="images for the prompt")
    p.add_argument("--seed", type=int, default=None, help="same seed, same image as diffusers "
                   "with torch.Generator('cpu').manual_seed(seed); random when omitted")
    p.add_argument("--seeds", type=seed_list, default=None, metavar="S1,S2,...",
                   help="one seed per image (the batch size is their count): image k is "
                        "then the image --seed Sk gives alone")
    p.add_argument("--latents", type=Path, default=None,
                   help="initial latents, a .npy of shape [batch, 4, height/8, width/8]")
    p.add_argument("--init-image", type=Path, default=None,
                   help="img2img: start from this image (output at its size, rounded down to "
                        "multiples of 8, unless --height/--width are given)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img/inpainting: how much to change the image, (0, 1]; 0.5 runs "
                        "half the steps (default 0.8; inpainting 1.0)")
    p.add_argument("--mask", type=Path, default=None,
                   help="inpainting: white repaints, black keeps (needs --init-image)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors, kohya/A1111 or diffusers/PEFT) at SCALE "
                        "(default 1); repeatable. Every backend: auto picks ort-cuda where it "
                        "runs (fp32), else ort-cpu; openvino recompiles; tensorrt needs "
                        "refittable plans")
    p.add_argument("--embedding", action="append", default=[], type=Path, metavar="FILE",
                   help="textual inversion: a .safetensors embedding (diffusers' or A1111's; "
                        "its word is the token it holds, or A1111's file name); repeatable. "
                        "Every backend (auto picks ort-cuda, else ort-cpu; tensorrt: "
                        "--refit plans)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"))
    p.add_argument("--no-safety", action="store_true", help="skip the safety checker")
    return p.parse_args(argv)


def seed_list(text: str) -> list[int]:
    """`--seeds 1,2,3`: comma-separated integers (ranges are checked with the settings)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


def check_output_dir(folder: Path) -> None:
    """Refuse early (before loading a model) an output folder that cannot exist."""
    why = why_not_creatable(folder)
    if why:
        raise UsageError(f"output folder {folder} is not usable: {why}")


def prepare_output_dir(folder: Path) -> None:
    """Create the folder and write a probe file: the one test that also holds for root,
    read-only mounts and /proc. Runs after validation, before generating."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"output folder {folder} is not writable: {e.strerror or e}") from None


MAX_LATENTS_BYTES = 1 << 30  # 64 images of 8192x8192 latents are 1 GiB of float32


def load_latents(path: Path) -> np.ndarray:
    """A .npy array, never unpickled; an empty, truncated or oversized file is one line."""
    try:  # read_small: a regular file within the cap (no FIFO, device or huge file)
        return np.load(io.BytesIO(read_small(path, MAX_LATENTS_BYTES)), allow_pickle=False)
    except (OSError, ValueError, EOFError, MemoryError) as e:
        raise UsageError(f"cannot read latents {path}: {first_line(e)}") from None


def read_images(args: argparse.Namespace) -> tuple[Image | None, Image | None]:
    """--init-image and --mask, decoded (UsageError with one line for a bad file)."""
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the image to paint into)")
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength:g}")

    try:
        image = None if args.init_image is None else check_image_size(load_image(args.init_image))
        return image, None if args.mask is None else load_image(args.mask)
    except ValueError as e:
        raise UsageError(str(e)) from None


def read_lora_args(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """--lora FILE[:SCALE] each: a scale in range, a file that exists (UsageError)."""
    try:
        loras = [parse_lora_arg(text) for text in args.lora]
    except LoraError as e:
        raise UsageError(str(e)) from None
    for text, (path, _) in zip(args.lora, loras, strict=True):
        if not path.is_file():
            head, _, tail = text.rpartition(":")
            if head and Path(head).is_file():
                raise UsageError(f"--lora {text}: the scale {tail!r} is not a number")
            raise UsageError(f"--lora {path}: no such file")
    if loras and args.backend in ("auto", "ort-cpu", "ort-cuda") and missing_support():
        raise UsageError(str(missing_support()))
    return loras


def read_embedding_args(args: argparse.Namespace, manifest: Manifest) -> None:
    """--embedding FILE each: a file this model's text encoder and tokenizer can take,
    its word new (UsageError), checked before anything loads."""
    if not args.embedding:
        return
    for path in args.embedding:
        if not path.is_file():
            raise UsageError(f"--embedding {path}: no such file")
    if args.backend in ("auto", "ort-cpu", "ort-cuda") and missing_support():
        raise UsageError("--embedding needs the onnx package: pip install 'sdrt[lora]'")
    bundle = resolve_model(args.model)
    read_embeddings(manifest, ClipTokenizer(bundle / TOKENIZER_DIR), args.embedding, args.backend)


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-")
    return s or "image"


def lora_fields(args: argparse.Namespace) -> dict[str, str]:
    """What PNGs say of --lora, made once per batch (it hashes each file): our `loras`
    key, and A1111's `<lora:name:scale>` prompt tags and `Lora hashes` field."""
    loras = [parse_lora_arg(text) for text in args.lora]  # checked before loading
    if not loras:
        return {}
    return {"loras": ", ".join(f"{p.name}:{s:g}" for p, s in loras),
            "tags": "".join(f" <lora:{p.stem}:{s:g}>" for p, s in loras),
            "hashes": ", ".join(f"{p.stem}: {file_hashes(p)[0][:12]}" for p, _ in loras)}


def metadata(result: Result, args: argparse.Namespace, backend: str, precision: str,
             index: int, loras: dict[str, str] | None = None) -> dict[str, str]:
    """The PNG's text chunks; `loras`: lora_fields(args), made once per batch."""
    loras = lora_fields(args) if loras is None else loras
    r = result.request
    prompt = r.prompts[index // r.images_per_prompt]
    negative = r.negative_prompts[index // r.images_per_prompt]
    meta = {
        "prompt": prompt, "negative_prompt": negative,
        "seed": str(r.image_seed(index)), "batch_index": str(index), "steps": str(r.steps),
        "scheduler": r.scheduler, "guidance_scale": f"{r.guidance_scale:g}",
        "size": f"{r.width}x{r.height}", "model": str(args.model), "backend": backend,
        "precision": precision,
        "safety_checker": "on" if result.safety_checked else "off",
    }
    if r.latents is not None:
        meta["latents"] = str(args.latents)
    if r.image is not None:
        meta.update({"mode": r.mode, "init_image": str(args.init_image),
                     "strength": f"{r.strength:g}"})
        if args.mask is not None:
            meta["mask"] = str(args.mask)
    if loras:
        meta["loras"] = loras["loras"]
    # A1111 keeps LoRAs in the prompt as <lora:name:scale>, their file hashes in a field
    meta["parameters"] = parameters_text(prompt + loras.get("tags", ""), negative, {
        "Steps": r.steps, "Sampler": A1111_SAMPLERS[r.scheduler],
        "CFG scale": f"{r.guidance_scale:g}", "Seed": r.image_seed(index),
        "Size": f"{r.width}x{r.height}", "Model": Path(str(args.model)).name,
        # with per-image seeds each image is reproducible alone: no batch position
        "Batch size": r.batch if r.batch > 1 and r.seeds is None else None,
        "Batch pos": index if r.batch > 1 and r.seeds is None else None,
        "Denoising strength": f"{r.strength:g}" if r.strength is not None else None,
        "Mask": "inpainting" if r.mask is not None else None,
        "Lora hashes": loras.get("hashes"),
        "Version": "sdrt"})
    return meta


def write_images(result: Result, args: argparse.Namespace, backend: str,
                 precision: str) -> list[Path]:
    """Every image of the batch, or none: encoded first, then written; a write that
    fails halfway removes those already written."""
    r = result.request
    loras = lora_fields(args)
    batch = [(f"{slug(r.prompts[0])}-{r.image_seed(i)}" + (f"-{i}" if r.batch > 1 else ""), ".png",
              png_bytes(image, metadata(result, args, backend, precision, i, loras)))
             for i, image in enumerate(result.images)]
    return write_all_new(args.output_dir, batch)


def progress_bar(total_hint: str):
    """A tqdm bar on a terminal; nothing when stderr is not a tty."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=total_hint, unit="step", leave=False, file=sys.stderr)

    def update(i: int, calls: int) -> None:
        bar.total = calls
        bar.update(i - bar.n)

    return update, bar.close


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        seeds = None
        if args.seeds is not None:
            if args.seed is not None or args.latents is not None:
                raise UsageError("--seeds gives every image its seed: drop --seed/--latents")
            if args.batch_size not in (1, len(args.seeds)):
                raise UsageError(f"--batch-size {args.batch_size} but {len(args.seeds)} seeds; "
                                 f"--seeds sets the batch size")
            args.batch_size = len(args.seeds)
            seeds = check_seeds(args.seeds, args.batch_size)
        seed = check_settings(args.steps, args.scheduler, args.guidance_scale, args.batch_size,
                              args.seed, args.height, args.width)  # before loading: fail fast
        if seeds is not None:
            seed = None
        check_text(args.prompt)
        check_text(args.negative_prompt or "")
        check_output_dir(args.output_dir)
        latents = None
        image, mask = read_images(args)  # before loading: a bad file costs no model load
        loras = read_lora_args(args)
        manifest = read_manifest(resolve_model(args.model))  # checks before any engine loads
        check_modes(manifest, image is not None, mask is not None, args.latents is not None)
        if loras:  # each file read and matched against the bundle's name map
            try:
                read_loras(manifest, loras)
            except LoraError as e:
                raise UsageError(str(e)) from None
        read_embedding_args(args, manifest)
        if image is not None:
            check_strength(args.strength if args.strength is not None else
                           1.0 if mask is not None else 0.8, args.steps)
        if args.latents:  # checked against the manifest's sizes
            h = manifest.default_height if args.height is None else args.height
            w = manifest.default_width if args.width is None else args.width
            latents = check_latents(load_latents(args.latents),
                                    (args.batch_size, LATENT_CHANNELS, h // VAE_FACTOR,
                                     w // VAE_FACTOR))
        backend = args.backend
        if (loras or args.embedding) and backend == "auto":
            backend = for_run_time_weights()
            say(f"backend: {backend} (run-time LoRAs and embeddings swap in place there; "
                f"--backend openvino or tensorrt take them too)")
        with Pipeline(args.model, backend, safety=not args.no_safety,
                      precision=args.precision, log=say) as pipe:
            if loras:
                pipe.set_loras(loras)
            if args.embedding:
                pipe.set_embeddings(args.embedding)
            req = pipe.request(args.prompt, args.negative_prompt, steps=args.steps,
                               scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                               height=args.height, width=args.width, batch_size=args.batch_size,
                               seed=seed, seeds=seeds, latents=latents,
                               safety=not args.no_safety,
                               image=image, mask=mask, strength=args.strength)
            prepare_output_dir(args.output_dir)
            say(f"model: {pipe.bundle} (loaded in {pipe.load_seconds:.2f} s)")
            if args.no_safety:
                say("safety checker: off (--no-safety)")
            elif not pipe.has_safety_checker:
                say("safety checker: none in this bundle")
            update, close = progress_bar("denoising")
            try:
                result = pipe.run(req, update)
            finally:
                close()
            paths = write_images(result, args, pipe.backend, pipe.precision)
    except (UsageError, BundleError) as e:
        say(f"error: {e}")
        return 2
    except (StageError, EngineError, OSError) as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    r = result.request
    limit = (f"{MAX_PROMPT_CHUNKS} chunks of 75 tokens" if pipe.manifest.max_text_tokens is None
             else "75 tokens (this bundle predates long prompts: re-export it)")
    for what, dropped in (("prompt", result.dropped_tokens),
                          ("negative prompt", result.dropped_negative_tokens)):
        if dropped and dropped[0]:  # chunks: a chunk ends at 75 tokens, a comma or BREAK
            say(f"warning: the {what} needs more than {limit}; its last {dropped[0]} "
                f"tokens were dropped")
    chunks = r.text_tokens // 77
    mode = "" if r.image is None else f"{r.mode} at strength {r.strength:g}, "
    say(f"{r.batch} image(s) {r.width}x{r.height}, {mode}{r.scheduler} {r.steps} steps "
        f"({r.unet_calls} UNet calls), guidance {r.guidance_scale:g}, "
        f"{'seeds ' + ','.join(map(str, r.seeds)) if r.seeds else f'seed {r.seed}'}, "
        f"text {chunks} chunk(s) of 77 tokens, backend {pipe.backend} {pipe.precision}")
    timings = {"load": pipe.load_seconds, **result.timings}
    calls = {"unet": f" ({len(result.unet_calls)} calls)"}  # img2img: fewer, by strength
    say("time: " + ", ".join(f"{k} {v:.2f} s{calls.get(k, '')}" for k, v in timings.items()))
    for i, flagged in enumerate(result.nsfw):
        if flagged:
            say(f"safety checker flagged image {i}: replaced by a black image")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One image to make (`Job`), what came of it (`Made`), and how a batch of jobs from
unrelated requests runs on one Pipeline: no Ray, no HTTP here (tests call it directly).

Jobs that share (size, steps, scheduler, guidance) run as one Pipeline call, one prompt
and one seed per image (`seeds=[...]`): image k of the call is bit for bit the image its
job gives alone (runtime/rng.py PerImageGenerators), so batching never changes a picture.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from runtime.args import first_line
from runtime.images import decode_image, png_bytes
from runtime.metadata import A1111_SAMPLERS, parameters_text
from runtime.pipeline import Pipeline, Request, UsageError


@dataclass(frozen=True)
class Job:
    """One image: everything that decides its pixels."""

    prompt: str
    negative_prompt: str
    steps: int
    scheduler: str
    guidance_scale: float
    width: int
    height: int
    seed: int
    loras: tuple[tuple[str, float], ...] = ()  # (name in the LoRA folder, scale), in order
    # img2img: the init image as a PNG at width x height (resized by the ingress)
    image: bytes | None = field(default=None, repr=False)
    image_sha: str = ""  # its sha256: which jobs share an init image
    strength: float | None = None  # img2img's denoising strength

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a UNet batch: one set of LoRAs and one init
        image per call."""
        return (self.width, self.height, self.steps, self.scheduler, self.guidance_scale,
                self.loras, self.image_sha, self.strength)

    def init_image(self) -> Image.Image | None:
        """The init image decoded as the CLI's --init-image is (UsageError)."""
        try:
            return None if self.image is None else decode_image(self.image)
        except ValueError as e:
            raise UsageError(str(e)) from None


@dataclass
class Made:
    """A job's outcome: a PNG, or the one-line reason it was refused."""

    png: bytes = b""
    seed: int = 0
    nsfw: bool = False
    infotext: str = ""  # A1111's parameters text (also in the PNG)
    batch: int = 0  # images in the Pipeline call it ran in
    timings: dict[str, float] = field(default_factory=dict)  # that call's stages, seconds
    error: str | None = None
    status: int = 400  # HTTP status of an error: 400 the request's fault, 500 ours


def infotext(job: Job, model: str) -> str:
    tags = "".join(f" <lora:{name}:{scale:g}>" for name, scale in job.loras)  # as A1111 keeps them
    return parameters_text(job.prompt + tags, job.negative_prompt, {
        "Steps": job.steps, "Sampler": A1111_SAMPLERS[job.scheduler],
        "CFG scale": f"{job.guidance_scale:g}", "Seed": job.seed,
        "Size": f"{job.width}x{job.height}", "Model": model,
        "Denoising strength": None if job.strength is None else f"{job.strength:g}",
        "Version": "sdrt"})


def check_job(pipe: Pipeline, job: Job, image: Image.Image | None) -> Request:
    """The job as a one-image request (`image`: its decoded init image): every check the
    Pipeline makes (UsageError)."""
    return pipe.request(job.prompt, job.negative_prompt, steps=job.steps,
                        scheduler=job.scheduler, guidance_scale=job.guidance_scale,
                        height=job.height, width=job.width, seeds=[job.seed],
                        image=image, strength=job.strength)


def lora_files(folder: Path | None, loras: tuple[tuple[str, float], ...]) -> list[tuple[Path, float]]:
    """`<lora:name:scale>` names -> files of the server's LoRA folder (UsageError)."""
    if loras and folder is None:
        raise UsageError("this server takes no LoRAs (start it with --lora-dir)")
    out = []
    for name, scale in loras:
        path = folder / (name if name.endswith(".safetensors") else f"{name}.safetensors")  # type: ignore[operator]
        if not path.is_file():
            raise UsageError(f"LoRA {name!r} is not in the server's LoRA folder")
        out.append((path, scale))
    return out


def run_jobs(pipe: Pipeline, jobs: Sequence[Job], model: str,
             lora_dir: Path | None = None) -> list[Made]:
    """Each job's outcome, in order. A refused job does not stop the others; jobs with
    one key run as one call, those needing the LoRAs already set first (a swap costs),
    then in the order their first job came."""
    made: list[Made | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    decoded: dict[str, Image.Image | None] = {}  # init images by sha256: each decoded once
    for i, job in enumerate(jobs):
        try:
            if job.image_sha not in decoded:
                decoded[job.image_sha] = job.init_image()
            req = check_job(pipe, job, decoded[job.image_sha])
        except UsageError as e:
            made[i] = Made(seed=job.seed, error=str(e))
            continue
        # the text length too: a call pads every prompt to its longest one's chunks,
        # which would change a short prompt's conditioning
        groups[(*job.key, req.text_tokens)].append(i)
    current = tuple((p.stem, s) for p, s in pipe.loras)
    for idx in sorted(groups.values(), key=lambda idx: jobs[idx[0]].loras != current):
        first = jobs[idx[0]]
        t = time.perf_counter()
        try:
            files = lora_files(lora_dir, first.loras)
            if [(p, s) for p, s in files] != list(pipe.loras):
                pipe.set_loras(files)  # UsageError: a LoRA this model cannot use
            result = pipe([jobs[i].prompt for i in idx], [jobs[i].negative_prompt for i in idx],
                          steps=first.steps, scheduler=first.scheduler,
                          guidance_scale=first.guidance_scale, height=first.height,
                          width=first.width, seeds=[jobs[i].seed for i in idx],
                          image=decoded[first.image_sha], strength=first.strength)
        except Exception as e:  # this call's images fail; the other groups still run
            for i in idx:
                made[i] = Made(seed=jobs[i].seed, error=first_line(e) or type(e).__name__,
                               status=400 if isinstance(e, UsageError) else 500)
            continue
        timings = {**result.timings, "batch_total": time.perf_counter() - t}
        for k, i in enumerate(idx):
            text = infotext(jobs[i], model)
            made[i] = Made(png_bytes(result.images[k], {"parameters": text}), jobs[i].seed,
                           bool(result.nsfw[k]), text, len(idx), timings)
    assert all(m is not None for m in made)
    return made  # type: ignore[return-value]

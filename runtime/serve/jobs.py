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

from runtime.args import first_line
from runtime.images import png_bytes
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

    @property
    def key(self) -> tuple[int, int, int, str, float]:
        """Jobs with equal keys can share a UNet batch."""
        return (self.width, self.height, self.steps, self.scheduler, self.guidance_scale)


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
    return parameters_text(job.prompt, job.negative_prompt, {
        "Steps": job.steps, "Sampler": A1111_SAMPLERS[job.scheduler],
        "CFG scale": f"{job.guidance_scale:g}", "Seed": job.seed,
        "Size": f"{job.width}x{job.height}", "Model": model, "Version": "sdrt"})


def check_job(pipe: Pipeline, job: Job) -> Request:
    """The job as a one-image request: every check the Pipeline makes (UsageError)."""
    return pipe.request(job.prompt, job.negative_prompt, steps=job.steps,
                        scheduler=job.scheduler, guidance_scale=job.guidance_scale,
                        height=job.height, width=job.width, seeds=[job.seed])


def run_jobs(pipe: Pipeline, jobs: Sequence[Job], model: str) -> list[Made]:
    """Each job's outcome, in order. A refused job does not stop the others; jobs with
    one key run as one call, in the order their first job came."""
    made: list[Made | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        try:
            req = check_job(pipe, job)
        except UsageError as e:
            made[i] = Made(seed=job.seed, error=str(e))
            continue
        # the text length too: a call pads every prompt to its longest one's chunks,
        # which would change a short prompt's conditioning
        groups[(*job.key, req.text_tokens)].append(i)
    for idx in groups.values():
        first = jobs[idx[0]]
        t = time.perf_counter()
        try:
            result = pipe([jobs[i].prompt for i in idx], [jobs[i].negative_prompt for i in idx],
                          steps=first.steps, scheduler=first.scheduler,
                          guidance_scale=first.guidance_scale, height=first.height,
                          width=first.width, seeds=[jobs[i].seed for i in idx])
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

"""The Ray Serve application: one ingress (FastAPI: both HTTP APIs, /health, /metrics,
backpressure) in front of N generator replicas, each holding one loaded Pipeline and
batching concurrent images with `@serve.batch` (runtime/serve/jobs.py: batching never
changes a picture).

    HTTP -> Ingress (1 replica, no CPU reserved) -> Generator x N (1 GPU each on GPU)

Bounds: each generator replica runs one batch while the next fills (max_ongoing_requests
= 2 x max_batch images); past `max_queued` images waiting at the ingress, requests get
503 with Retry-After, not a timeout. A client that disconnects cancels its images that
have not started.

`build(args)` is the application builder `serve deploy` and `serve run` take
(runtime/serve/serve_config.yaml); `python -m runtime.serve` calls it too.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at run time
import asyncio
import base64
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from runtime.args import first_line
from runtime.bundle import MAX_BATCH, MAX_SIDE, TOKENIZER_DIR, VAE_FACTOR, read_manifest, resolve_model
from runtime.embeddings import Embedding
from runtime.lora_apply import missing_support
from runtime.metadata import A1111_SAMPLERS
from runtime.pipeline import UsageError
from runtime.serve.api import (
    A1111_ALIASES,
    ImagesGenerations,
    Img2Img,
    Limits,
    Txt2Img,
    check_overrides,
)
from runtime.serve.jobs import Job, Made, run_jobs
from runtime.serve.metrics import Metrics

GPU_BACKENDS = ("tensorrt", "ort-cuda")
SERVE_APP = "sdrt"  # the application's name from the CLI (serve_config.yaml names its own)
HEALTH_CACHE_S = 2.0  # /health asks the Serve controller at most this often
MAX_BODY_BYTES = 48 << 20  # a request body: a 32 MiB init image in base64 and the rest
# Serve ships the decorated classes by value when they are defined (cloudpickle): what
# their methods use must be defined above them


@dataclass(frozen=True)
class Settings:
    model: str = "demo"
    backend: str = "auto"
    replicas: int = 1
    max_batch: int = 8  # images per UNet batch
    batch_wait_ms: float = 50.0  # how long a batch waits to fill once its first image came
    max_queued: int = 64  # images waiting at the ingress before 503s
    gpus_per_replica: float | None = None  # None: 1 for a GPU backend or a GPU cluster, else 0
    safety: bool = True
    max_images: int = 16  # per request
    max_side: int = 1024  # px, per request
    max_steps: int = 150  # per request: a replica is never held for hours by one request
    lora_dir: str | None = None  # <lora:name:scale> in prompts: name.safetensors from here
    embeddings_dir: str | None = None  # textual inversion: every .safetensors here, loaded

    def embedding_files(self) -> list[Path]:
        folder = self.embeddings_dir
        return sorted(Path(folder).glob("*.safetensors")) if folder is not None else []

    @property
    def limits(self) -> Limits:
        return Limits(self.max_images, self.max_side, self.max_steps, self.lora_dir is not None)

    @property
    def pipeline_backend(self) -> str:
        """`auto` with a LoRA or embeddings folder: where they swap in place (ort-cuda, or
        ort-cpu), evaluated where the replica runs."""
        weights = self.lora_dir is not None or self.embeddings_dir is not None
        if weights and self.backend == "auto":
            from runtime.backends import for_run_time_weights

            return for_run_time_weights()
        return self.backend

    def check(self) -> None:
        """UsageError with one line, before anything starts."""
        for name, low, high in (("replicas", 1, 1024), ("max_batch", 1, MAX_BATCH),
                                ("max_queued", 1, 1 << 20), ("max_images", 1, MAX_BATCH),
                                ("max_side", VAE_FACTOR, MAX_SIDE), ("max_steps", 1, 10_000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise UsageError(f"{name} must be an integer in [{low}, {high}], got {v!r}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise UsageError(f"batch_wait_ms must be in [0, 10000], got {self.batch_wait_ms}")
        if self.lora_dir is not None:
            if not Path(self.lora_dir).is_dir():
                raise UsageError(f"LoRA folder {self.lora_dir} is not a folder")
            why = missing_support() if self.pipeline_backend in ("ort-cpu", "ort-cuda") else None
            if why:
                raise UsageError(why)
        read_manifest(resolve_model(self.model))  # BundleError: not a bundle
        if self.embeddings_dir is not None:
            check_embeddings(self)


def check_embeddings(s: Settings) -> list[Embedding]:
    """The embeddings folder's files, as the replicas will load them (UsageError)."""
    from runtime.pipeline_weights import read_embeddings
    from runtime.tokenizer import ClipTokenizer

    if not Path(str(s.embeddings_dir)).is_dir():
        raise UsageError(f"embeddings folder {s.embeddings_dir} is not a folder")
    if s.pipeline_backend in ("ort-cpu", "ort-cuda") and missing_support():
        raise UsageError("textual-inversion embeddings need the onnx package: "
                         "pip install 'sdrt[lora]'")
    bundle = resolve_model(s.model)
    return read_embeddings(read_manifest(bundle), ClipTokenizer(bundle / TOKENIZER_DIR),
                           s.embedding_files(), s.pipeline_backend)


def embeddings_listing(s: Settings) -> dict[str, Any]:
    """A1111's /sdapi/v1/embeddings for the folder the replicas loaded at start."""
    width = read_manifest(resolve_model(s.model)).hidden
    loaded = check_embeddings(s) if s.embeddings_dir is not None else []
    return {"loaded": {e.token: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                 "shape": width, "vectors": len(e.vectors)} for e in loaded},
            "skipped": {}}


def model_info(model: str) -> dict[str, Any]:
    """What the A1111/OpenAI model listings show, from the bundle's manifest."""
    path = resolve_model(model)
    m = read_manifest(path)
    return {"name": model if model == "demo" else path.name, "path": str(path),
            "hash": str(m.source.get("hash", "")), "default_size": [m.default_width, m.default_height]}


class Overloaded(Exception):
    pass


def cancel(responses: list) -> None:
    """Cancel a request's other images; one whose routing already failed raises its
    error again from cancel(), which changes nothing here."""
    for r in responses:
        try:
            r.cancel()
        except Exception:  # noqa: BLE001 (nothing left to cancel)
            pass


@serve.deployment(health_check_period_s=5, health_check_timeout_s=60)
class Generator:
    """One Pipeline; concurrent images batched (at most max_batch, waiting batch_wait_ms)."""

    def __init__(self, settings: dict[str, Any]):
        from runtime.pipeline import Pipeline

        s = Settings(**settings)
        self.pipe = Pipeline(s.model, s.pipeline_backend, safety=s.safety,
                             log=lambda m: print(m, flush=True))
        self.lora_dir = Path(s.lora_dir) if s.lora_dir is not None else None
        if s.embedding_files():
            self.pipe.set_embeddings(s.embedding_files())
        self.name = s.model if s.model == "demo" else self.pipe.bundle.name
        self.made = 0  # images made by this replica (tests: cancelled work is not done)
        self.generate.set_max_batch_size(s.max_batch)
        self.generate.set_batch_wait_timeout_s(s.batch_wait_ms / 1000)

    def check_health(self) -> None:
        """Serve replaces a replica whose Pipeline lost its engines (a failed reload)."""
        if not self.pipe.engines:
            raise RuntimeError("the Pipeline has no engines")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.pipe.backend, "precision": self.pipe.precision, "made": self.made}

    @serve.batch  # max_batch_size and batch_wait_timeout_s: set from Settings in __init__
    async def generate(self, jobs: list[Job]) -> list[Made]:
        # the Pipeline blocks: a worker thread keeps this replica answering meanwhile
        made = await asyncio.to_thread(run_jobs, self.pipe, jobs, self.name, self.lora_dir)
        self.made += sum(m.error is None for m in made)
        return made


METRICS = Metrics()  # per process: the ingress replica's


def process_metrics() -> Metrics:
    """This process's METRICS, looked up in the imported module: Serve ships the FastAPI
    app's middleware by value (cloudpickle), whose globals would be a copy of its own."""
    return sys.modules[__name__].METRICS  # type: ignore[attr-defined]


app = FastAPI(title="sdrt", description="Stable Diffusion v1.x on sdrt engines: "
              "AUTOMATIC1111 and OpenAI image APIs, dynamically batched.")


def _error(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    if request.url.path.startswith("/v1/"):  # OpenAI's error shape (the openai client reads it)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body: dict = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    else:  # A1111's
        kind = {503: "Overloaded", 500: "InternalServerError"}.get(status, "BadRequest")
        body = {"error": kind, "detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return _error(request, 422, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))


@app.middleware("http")
async def _count(request: Request, call_next):
    t = time.perf_counter()
    status = 500  # an exception out of a route is a 500 to the client
    try:
        size = request.headers.get("content-length", "0")
        if size.isdigit() and int(size) > MAX_BODY_BYTES:  # before the body is read
            response = _error(request, 413, f"request body of {int(size) >> 20} MiB; at most "
                              f"{MAX_BODY_BYTES >> 20} MiB")
            status = 413
            return response
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        # the route's template as the label (a scan of random paths adds no series)
        route = getattr(request.scope.get("route"), "path", "other")
        process_metrics().requests.labels(route, str(status)).inc()
        if request.method == "POST":
            process_metrics().latency.labels(route).observe(time.perf_counter() - t)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    def __init__(self, generator: DeploymentHandle, settings: dict[str, Any]):
        self.gen = generator
        self.settings = Settings(**settings)
        self.model = model_info(self.settings.model)  # from the manifest: no generator call
        self.embedding_list = embeddings_listing(self.settings)  # read once, as the replicas
        self.recent_batch_s = 1.0  # for Retry-After
        self.health_at, self.running = -math.inf, 0  # /health's last look at Serve's state

    async def _make(self, jobs: list[Job]) -> list[Made]:
        """Every job's outcome, or Overloaded. Cancelled (client gone): its jobs that have
        not started are dropped by Serve."""
        process_metrics().queued.inc(len(jobs))
        responses: list = []
        try:
            for job in jobs:
                responses.append(self.gen.generate.remote(job))
            made = list(await asyncio.gather(*responses))
        except BaseException as e:  # overloaded, the client gone, a replica dead: the
            cancel(responses)  # request's other images are not wanted
            if isinstance(e, BackPressureError):
                raise Overloaded() from None
            raise
        finally:
            process_metrics().queued.dec(len(jobs))
        for m in made:
            if m.error is None:
                process_metrics().made(m.batch, m.timings)
                self.recent_batch_s = m.timings.get("batch_total", self.recent_batch_s)
        return made

    async def _run(self, request: Request, jobs_of) -> tuple[list[Job], list[Made]] | JSONResponse:
        """The request's jobs (`jobs_of()`) and their outcomes, or the error response."""
        try:
            jobs = await asyncio.to_thread(jobs_of)  # an init image's decode: off the event loop
            made = await self._make(jobs)
        except UsageError as e:
            return _error(request, 400, str(e))
        except Overloaded:
            wait = str(max(1, math.ceil(self.recent_batch_s)))
            return _error(request, 503, f"server busy: more than {self.settings.max_queued} "
                          f"images queued; retry in {wait} s", {"Retry-After": wait})
        except Exception as e:  # e.g. the replica died mid-batch (Serve replaces it)
            return _error(request, 500, f"generation failed: {type(e).__name__}: "
                          f"{first_line(e)[:200]}; retry")
        refused = [m for m in made if m.error]
        if refused:
            return _error(request, refused[0].status, str(refused[0].error))
        return jobs, made

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(self, body: Txt2Img, request: Request):
        return await self._a1111(body, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(self, body: Img2Img, request: Request):
        return await self._a1111(body, request)

    async def _a1111(self, body: Txt2Img, request: Request):
        """txt2img and img2img: A1111's response (images, parameters, info JSON)."""
        model = self.model
        done = await self._run(request, lambda: body.jobs(self.settings.limits, self._options()))
        if isinstance(done, JSONResponse):
            return done
        jobs, out = done
        first = out[0]
        info = {
            "prompt": body.prompt, "all_prompts": [body.prompt] * len(out),
            "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * len(out),
            "seed": first.seed, "all_seeds": [m.seed for m in out], "subseed": -1,
            "all_subseeds": [-1] * len(out), "subseed_strength": 0,
            "width": jobs[0].width, "height": jobs[0].height,
            "sampler_name": A1111_SAMPLERS[jobs[0].scheduler], "cfg_scale": body.cfg_scale,
            "steps": body.steps, "batch_size": body.batch_size, "n_iter": body.n_iter,
            "restore_faces": False, "sd_model_name": model["name"],
            "sd_model_hash": model["hash"][:10], "clip_skip": 1,
            "infotexts": [m.infotext for m in out], "nsfw": [m.nsfw for m in out],
            "batch_sizes": [m.batch for m in out], "version": "sdrt",
            **({"denoising_strength": jobs[0].strength} if jobs[0].strength is not None else {})}
        return {"images": [base64.b64encode(m.png).decode() for m in out],
                # as A1111: the parameters without the (large) input images
                "parameters": body.model_dump(exclude={"init_images", "mask"}) | (
                    {"init_images": None, "mask": None} if isinstance(body, Img2Img) else {}),
                "info": json.dumps(info)}

    @app.post("/v1/images/generations")
    async def images(self, body: ImagesGenerations, request: Request):
        model = self.model
        done = await self._run(request, lambda: body.jobs(
            tuple(model["default_size"]), self.settings.limits))
        if isinstance(done, JSONResponse):
            return done
        out = done[1]
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(m.png).decode(), "revised_prompt": body.prompt,
                          "seed": m.seed} for m in out]}

    @app.get("/sdapi/v1/samplers")
    async def samplers(self):
        return [{"name": A1111_SAMPLERS[k], "aliases": A1111_ALIASES[k], "options": {}}
                for k in A1111_SAMPLERS]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models(self):
        m = self.model
        return [{"title": f"{m['name']} [{m['hash'][:10]}]", "model_name": m["name"],
                 "hash": m["hash"][:10], "sha256": m["hash"], "filename": m["path"], "config": None}]

    def _options(self) -> dict[str, Any]:
        m = self.model
        return {"sd_model_checkpoint": f"{m['name']} [{m['hash'][:10]}]",
                "sd_checkpoint_hash": m["hash"], "CLIP_stop_at_last_layers": 1,
                "samples_format": "png"}

    @app.get("/sdapi/v1/options")
    async def options(self):
        return self._options()

    @app.post("/sdapi/v1/options")
    async def set_options(self, body: dict[str, Any], request: Request):
        """Clients post the options they read (the checkpoint they want): what /options
        says is accepted, anything else refused, as in override_settings."""
        try:
            check_overrides(body, self._options())
        except UsageError as e:
            return _error(request, 400, str(e))
        return None

    @app.get("/sdapi/v1/schedulers")
    async def schedulers(self):
        return [{"name": "automatic", "label": "Automatic", "aliases": None},
                {"name": "karras", "label": "Karras", "aliases": None}]

    @app.get("/sdapi/v1/loras")
    async def loras(self):
        """The LoRA folder's files, as A1111 lists them (name: what <lora:name:...> takes)."""
        folder = self.settings.lora_dir
        files = sorted(Path(folder).glob("*.safetensors")) if folder else []
        return [{"name": f.stem, "alias": f.stem, "path": str(f), "metadata": {}} for f in files]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings(self):
        """The loaded textual-inversion embeddings, as A1111 lists them (by their word)."""
        return self.embedding_list

    @app.get("/sdapi/v1/scripts")
    async def scripts(self):
        return {"txt2img": [], "img2img": []}

    @app.get("/v1/models")
    async def models(self):
        m = self.model
        return {"object": "list", "data": [{"id": m["name"], "object": "model", "created": 0,
                                            "owned_by": "sdrt"}]}

    @app.get("/health")
    async def health(self, request: Request):
        """From Serve's own state (a replica busy with a batch is healthy): 200 while
        at least one generator replica runs, else 503."""
        now = time.monotonic()
        if now - self.health_at > HEALTH_CACHE_S:  # serve.status() is a blocking RPC
            try:
                status = await asyncio.wait_for(asyncio.to_thread(serve.status), 5)
                app_status = status.applications[serve.get_replica_context().app_name]
                self.running = app_status.deployments["Generator"].replica_states.get("RUNNING", 0)
            except Exception as e:  # noqa: BLE001 (the controller is gone or restarting)
                return _error(request, 503, f"Serve status unavailable: {type(e).__name__}")
            self.health_at = now
        replicas = self.running
        if not replicas:
            return _error(request, 503, "no model replica is running (starting or replaced)")
        return {"status": "ok", "model": self.model["name"], "replicas": replicas}

    @app.get("/sdrt/v1/replica")
    async def replica(self, request: Request):
        """One generator replica's backend, precision and images made (queued behind its
        work like any request: not a health check)."""
        try:
            return await asyncio.wait_for(self.gen.describe.remote(), timeout=60)
        except Exception as e:  # noqa: BLE001
            return _error(request, 503, f"no model replica answered: {type(e).__name__}")

    @app.get("/metrics")
    async def metrics(self):
        return Response(process_metrics().text(), media_type=process_metrics().content_type)


def gpus_per_replica(s: Settings, have: dict[str, float]) -> float:
    """1 for a GPU backend, or `auto` on a cluster with GPUs; else 0 (CPU replicas)."""
    if s.gpus_per_replica is not None:
        return s.gpus_per_replica
    on_gpu = s.backend in GPU_BACKENDS or (s.backend == "auto" and have.get("GPU", 0) > 0)
    return 1.0 if on_gpu else 0.0


def check_resources(s: Settings, have: dict[str, float]) -> None:
    """UsageError when a fixed machine (the CLI's local Ray) cannot place every replica:
    Serve would leave the app deploying forever. Not for clusters that grow on demand."""
    gpus = gpus_per_replica(s, have)
    if gpus * s.replicas > have.get("GPU", 0):
        raise UsageError(f"{s.replicas} replica(s) x {gpus:g} GPU but this machine has "
                         f"{have.get('GPU', 0):g} GPU(s)")
    if not gpus and s.replicas > have.get("CPU", 0):
        raise UsageError(f"{s.replicas} replica(s) x 1 CPU but this machine has "
                         f"{have.get('CPU', 0):g} CPU(s)")


def build(args: dict[str, Any]) -> serve.Application:
    """The application from Settings fields (the CLI's flags; serve_config.yaml's args)."""
    s = Settings(**args)
    s.check()
    import ray  # noqa: I001 (the cluster's resources, when connected)

    gpus = gpus_per_replica(s, ray.cluster_resources() if ray.is_initialized() else {})
    generator = Generator.options(
        num_replicas=s.replicas, max_ongoing_requests=2 * s.max_batch,
        max_queued_requests=s.max_queued,
        ray_actor_options={"num_cpus": 0 if gpus else 1, "num_gpus": gpus}).bind(asdict(s))
    return Ingress.bind(generator, asdict(s))

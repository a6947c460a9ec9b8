"""GET /metrics: Prometheus text from the ingress (every request passes through it, so
one ingress replica sees them all). A registry of its own: nothing global is touched."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGES = ("text_encoder", "denoise", "vae_decoder", "safety_checker", "batch_total")
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sdrt_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.images = Counter("sdrt_images", "images made", registry=r)
        self.queued = Gauge("sdrt_queue_depth",
                            "images accepted and not yet made (running or waiting)", registry=r)
        self.latency = Histogram("sdrt_request_seconds", "request latency, accepted to answered",
                                 ["route"], buckets=SECONDS, registry=r)
        self.batch = Histogram("sdrt_batch_size", "images in the Pipeline call each image ran in",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.stage = Histogram("sdrt_stage_seconds", "Pipeline stage time of each image's call",
                               ["stage"], buckets=SECONDS, registry=r)

    def made(self, batch: int, timings: dict[str, float]) -> None:
        self.images.inc()
        self.batch.observe(batch)
        for stage in STAGES:
            if stage in timings:
                self.stage.labels(stage).observe(timings[stage])

    def text(self) -> bytes:
        return generate_latest(self.registry)

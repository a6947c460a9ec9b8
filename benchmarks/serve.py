"""`python -m benchmarks.serve`: load test of `runtime.serve` on 127.0.0.1, batching on vs off.

Each phase starts a fresh local Serve app, warms it up, then runs N closed-loop clients
(each sends a request, waits for the answer, sends the next) for T seconds: throughput,
p50/p99 latency, the batch sizes images ran in, and every non-200 answer counted. A last
phase sends more concurrent requests than the queue bound holds: those past it must get
503 (with Retry-After), none a timeout or another error.

    python -m benchmarks.serve --model demo --clients 8 --seconds 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks import machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class App:
    """A local Serve app for one phase (started and shut down around it)."""

    def __init__(self, settings: dict):
        import ray
        from ray import serve

        from runtime.serve.app import build

        self.ray, self.serve = ray, serve
        port = free_port()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(settings), name="sdrt", route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.serve.shutdown()
        self.ray.shutdown()


def request(url: str, body: dict) -> tuple[int, float, list[int], str | None]:
    """(status, seconds, batch sizes its images ran in, Retry-After)."""
    t = time.perf_counter()
    try:
        r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)
    except requests.RequestException as e:
        return -1, time.perf_counter() - t, [], type(e).__name__
    seconds = time.perf_counter() - t
    batches = json.loads(r.json()["info"])["batch_sizes"] if r.status_code == 200 else []
    return r.status_code, seconds, batches, r.headers.get("Retry-After")


def closed_loop(url: str, clients: int, seconds: float, body: dict) -> dict:
    stop = time.perf_counter() + seconds
    results: list[tuple[int, float, list[int], str | None]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            out = request(url, {**body, "prompt": f"{body['prompt']} {k}", "seed": k * 100_000 + n})
            n += 1
            with lock:
                results.append(out)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    ok = [r for r in results if r[0] == 200]
    latencies = [r[1] for r in ok]
    return {"clients": clients, "seconds": round(wall, 2), "requests": len(results),
            "images_per_s": round(len(ok) / wall, 3),
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
            "failed": dict(Counter(str(r[0]) for r in results if r[0] != 200)),
            "batch_sizes": dict(sorted(Counter(b for r in ok for b in r[2]).items()))}


def burst(url: str, n: int, body: dict) -> dict:
    with ThreadPoolExecutor(n) as pool:
        out = list(pool.map(lambda k: request(url, {**body, "seed": k}), range(n)))
    codes = Counter(str(r[0]) for r in out)
    return {"requests": n, "status": dict(codes),
            "retry_after_on_every_503": all(r[3] for r in out if r[0] == 503)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queued", type=int, default=16)
    p.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    body = {"prompt": "a red circle", "width": a.size, "height": a.size, "steps": a.steps,
            "sampler_name": "Euler a"}
    phases = {"batching": (a.max_batch, 50.0), "one_at_a_time": (1, 0.0)}
    out: dict = {"command": "python -m benchmarks.serve " + " ".join(sys.argv[1:] if argv is None else argv),
                 "settings": vars(a) | {"json": None}, "machine": machine.name(machine.info()),
                 "cpu": machine.info()["cpu"]}
    for name, (max_batch, wait) in phases.items():
        app = App({"model": a.model, "backend": a.backend, "max_batch": max_batch,
                   "batch_wait_ms": wait, "max_queued": a.max_queued, "safety": True})
        try:
            closed_loop(app.url, a.clients, min(10.0, a.seconds / 4), body)  # warm-up
            out[name] = closed_loop(app.url, a.clients, a.seconds, body)
            print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
            if name == "batching":  # past the bound: 2 x max_batch run or wait at a replica
                out["overload"] = burst(app.url, 2 * max_batch + a.max_queued + 16, body)
        finally:
            app.close()
    out["throughput_ratio"] = round(out["batching"]["images_per_s"]
                                    / out["one_at_a_time"]["images_per_s"], 2)
    line = json.dumps(out)
    print(line)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m runtime.serve`: serve a bundle over HTTP (A1111 and OpenAI image APIs).

    python -m runtime.serve --model demo --port 8000
    python -m runtime.serve --model /models/sd14 --backend tensorrt --replicas 4 --address auto

Without --address it starts a local Ray instance (one command, no cluster); with
--address (`auto`, or ray://head:10001) it deploys onto that cluster. For a cluster
managed by config, `serve deploy runtime/serve/serve_config.yaml` takes the same
settings (README: Serving).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict

from runtime.args import OneLineParser
from runtime.backends import BACKENDS
from runtime.bundle import BundleError
from runtime.pipeline import UsageError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="bundle folder, or `demo` (built in)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--replicas", type=int, default=1, help="generator replicas (one Pipeline "
                   "each; one GPU each on GPU backends)")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1; with "
                   "--address 0.0.0.0, every interface of every node)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="images per UNet batch")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="how long a batch waits to fill after its first image")
    p.add_argument("--max-queued", type=int, default=64,
                   help="images waiting before requests get 503 (Retry-After)")
    p.add_argument("--no-batching", action="store_true", help="one image per UNet call")
    p.add_argument("--max-images", type=int, default=16, help="images per request at most")
    p.add_argument("--max-side", type=int, default=1024, help="width and height at most (px)")
    p.add_argument("--max-steps", type=int, default=150, help="steps per request at most")
    p.add_argument("--no-safety", action="store_true", help="skip the safety checker")
    p.add_argument("--lora-dir", default=None, help="a folder of LoRA .safetensors files: "
                   "prompts then take A1111's <lora:name:scale> (auto: ort-cuda where it "
                   "runs, else ort-cpu; openvino; tensorrt with refittable plans)")
    p.add_argument("--embeddings-dir", default=None, help="a folder of textual-inversion "
                   ".safetensors embeddings, all loaded: prompts take their words (auto: ort-cuda where it "
                   "runs, else ort-cpu; openvino; tensorrt with refittable plans)")
    p.add_argument("--address", default=None, help="a Ray cluster to deploy onto (auto, "
                   "ray://host:10001); default: a local Ray instance")
    return p.parse_args(argv)


def check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UsageError(f"port must be in [1, 65535], got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        import ray
        from ray import serve

        from runtime.serve.app import SERVE_APP, Settings, build, check_resources
    except ImportError as e:
        say(f"error: serving needs the serve extra (pip install 'sdrt[serve]'): {e}")
        return 2
    settings = Settings(model=args.model, backend=args.backend, replicas=args.replicas,
                        max_batch=1 if args.no_batching else args.max_batch,
                        batch_wait_ms=0.0 if args.no_batching else args.batch_wait_ms,
                        max_queued=args.max_queued, safety=not args.no_safety,
                        lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                        max_images=args.max_images,
                        max_side=args.max_side, max_steps=args.max_steps)
    host = args.host or ("127.0.0.1" if args.address is None else "0.0.0.0")
    try:
        settings.check()
        if args.address is None:
            check_port(host, args.port)
    except (UsageError, BundleError) as e:
        say(f"error: {e}")
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from here
    ray.init(address=args.address, include_dashboard=False,
             **({"num_cpus": os.cpu_count()} if args.address is None else {}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if args.address is None:  # a fixed machine: replicas it cannot place are an error
            check_resources(settings, ray.cluster_resources())
        serve.start(http_options={"host": host, "port": args.port})
        serve.run(build(asdict(settings)), name=SERVE_APP, route_prefix="/")
        if args.address is not None:  # the cluster keeps serving after this command
            say(f"deployed {args.model} as application {SERVE_APP} on {args.address}")
            return 0
        say(f"serving {args.model} on http://{host}:{args.port} "
            f"(API docs: http://{host}:{args.port}/docs); Ctrl-C stops")
        stop.wait()
    except KeyboardInterrupt:
        pass
    except (UsageError, BundleError) as e:  # e.g. more replicas than the cluster can place
        say(f"error: {e}")
        return 2
    except Exception as e:  # a replica that cannot start (its log above says why)
        say(f"error: the application did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 1
    finally:
        if args.address is None:
            serve.shutdown()
            ray.shutdown()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

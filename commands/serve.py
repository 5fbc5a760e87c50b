"""`launch.py serve MODEL`: an HTTP JSON endpoint on Ray Serve (POST /predict)."""

from __future__ import annotations

import argparse
import time


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder, a sweep's best/ folder or an exported folder")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 exposes the "
                   "endpoint to the network: put authentication in front of it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--no-batching", action="store_true", help="one forward pass per request")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests merged by "
                   "@serve.batch into one forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits "
                   "for more requests")
    p.add_argument("--replicas", type=int, default=1, help="model replicas")
    p.add_argument("--max-inputs", type=int, help="texts/images per request, more get a 413 "
                   "(default 64)")
    p.add_argument("--max-chars", type=int, help="characters per text, more get a 413 "
                   "(default 4000)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: "
                   "until Ctrl-C)")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")


def run_serve(args: argparse.Namespace) -> int:
    from cluster.serve import ServeLimits, serve_model

    given = {"max_inputs": args.max_inputs, "max_chars": args.max_chars}
    limits = ServeLimits(**{k: v for k, v in given.items() if v is not None})
    url = serve_model(args.model, host=args.host, port=args.port, batched=not args.no_batching,
                      max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                      replicas=args.replicas, limits=limits, address=args.address)
    print(f"serving {args.model} at {url}/predict  (Ctrl-C stops)\n"
          f"  curl -s {url}/predict -H 'Content-Type: application/json' "
          f"-d '{{\"texts\": [\"a moving film\"]}}'", flush=True)
    from ray import serve

    try:
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        serve.shutdown()
    return 0

"""Serve throughput and latency: the Ray Serve endpoint with and without ``@serve.batch``.

One Serve instance on 127.0.0.1 holds the same MiniLM model twice: ``/batched`` (requests merged
into one forward pass, max 16, 5 ms wait) and ``/unbatched`` (a forward pass per request), each
one replica with one CPU. Closed-loop clients (1 or 16 threads, keep-alive connections) each
send one-sentence requests back to back for ``--seconds`` after a warm-up; the test stops by
itself. Cases take turns over ``--rounds`` rounds so other load on the machine falls on all
alike; requests/s is the mean over rounds, latency percentiles pool every request of a case.

    python -m benchmarks.serve_load                  # ~6 min on 2 cores
    python -m benchmarks.serve_load --seconds 5 --rounds 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [
    "a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate .",
    "it 's a charming and often affecting journey .", "dull , lifeless and irritating .",
    "an ambitious film that never quite comes together",
    "a thoroughly engaging , surprisingly touching british comedy .", "the acting is stiff and the story goes nowhere .",
    "one of the best films of the year , full of life and humour .",
]


def train_model(out: Path) -> Path:
    """A MiniLM run folder (two steps: the speed of a forward pass does not depend on them)."""
    from trainers.loop import fit
    from trainers.recipe import load_config

    cfg = load_config(ROOT / "configs" / "sst2-minilm.yaml", [
        "data.shots=4", "train.max_steps=2", "train.test=false", f"train.output_dir={out}",
        "train.run_name=serve-bench", "train.progress=false"])
    return fit(cfg).run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port: int, path: str, stop: float, seed: int, latencies: list[float],
           errors: list[str]) -> None:
    """Send one-sentence requests back to back until ``stop`` (monotonic clock)."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        while time.monotonic() < stop:
            body = json.dumps({"texts": [rng.choice(SENTENCES)]})
            t0 = time.perf_counter()
            conn.request("POST", f"{path}/predict", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200:
                errors.append(f"{resp.status} {data[:100]!r}")
                continue
            latencies.append(dt)
    except OSError as e:
        errors.append(repr(e))
    finally:
        conn.close()


def load(port: int, path: str, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Closed-loop load; the warm-up's requests are sent but not counted."""
    warm: list[float] = []
    errs: list[str] = []
    threads = [threading.Thread(target=client, args=(port, path, time.monotonic() + warmup, i,
                                                     warm, errs)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat: list[float] = []
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(port, path, start + seconds, 100 + i, lat,
                                                     errs)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {"requests": len(lat), "wall_s": wall, "rps": len(lat) / wall, "latencies": lat,
            "errors": errs[:5], "error_count": len(errs)}


def served(port: int, path: str) -> dict[str, int]:
    """The endpoint's own counters: requests answered and forward passes run."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", f"{path}/")
        return json.loads(conn.getresponse().read())["served"]
    finally:
        conn.close()


def model_cost(model: Path, repeats: int = 20) -> dict[str, float]:
    """In-process forward time (1 thread, as a 1-CPU replica) for 1 and 16 sentences, ms."""
    import torch

    from trainers.predictor import load_predictor

    torch.set_num_threads(1)
    predictor = load_predictor(model)
    out = {}
    for n in (1, 16):
        texts = (SENTENCES * 2)[:n]
        predictor.predict(texts)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predictor.predict(texts, batch_size=n)
            times.append(time.perf_counter() - t0)
        out[f"batch_{n}_ms"] = statistics.median(times) * 1e3
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model folder (default: train a MiniLM run in a temp dir)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per case/round")
    p.add_argument("--warmup", type=float, default=3.0, help="uncounted seconds before each")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all cases, taking turns")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
    model = Path(args.model) if args.model else train_model(Path(tmp.name))
    import ray
    from ray import serve

    from cluster.serve import serve_model

    load_before = os.getloadavg()
    cost = model_cost(model)
    print(f"model alone: {cost['batch_1_ms']:.1f} ms for 1 sentence, {cost['batch_16_ms']:.1f} "
          f"ms for 16", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = free_port()
    for name, batched in (("batched", True), ("unbatched", False)):
        serve_model(model, port=port, batched=batched, max_batch_size=16, batch_wait_s=0.005,
                    name=name, route_prefix=f"/{name}", cpus_per_replica=1.0)
    cases = [(mode, c) for c in args.clients for mode in ("batched", "unbatched")]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for mode, c in cases:
            before = served(port, f"/{mode}")
            out = load(port, f"/{mode}", c, args.seconds, args.warmup)
            after = served(port, f"/{mode}")  # warm-up included: a ratio, not a count
            out["per_pass"] = ((after["requests"] - before["requests"])
                               / max(after["forward_passes"] - before["forward_passes"], 1))
            results[(mode, c)].append(out)
            print(f"round {r + 1}: {mode:9s} {c:2d} client(s): {out['rps']:6.1f} req/s, "
                  f"p50 {pct(out['latencies'], 50) * 1e3:6.1f} ms, "
                  f"p99 {pct(out['latencies'], 99) * 1e3:6.1f} ms, "
                  f"{out['per_pass']:.1f} request(s)/forward pass, {out['error_count']} error(s)",
                  flush=True)
    serve.shutdown()
    ray.shutdown()
    load_after = os.getloadavg()

    summary = []
    for mode, c in cases:
        runs = results[(mode, c)]
        lat = [x for run in runs for x in run["latencies"]]
        summary.append({"mode": mode, "clients": c, "rps": statistics.fmean(r["rps"] for r in runs),
                        "rps_per_round": [r["rps"] for r in runs], "requests": len(lat),
                        "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                        "requests_per_forward_pass": statistics.fmean(r["per_pass"] for r in runs),
                        "errors": sum(r["error_count"] for r in runs)})
    by = {(s["mode"], s["clients"]): s for s in summary}
    ratios = {c: by[("batched", c)]["rps"] / by[("unbatched", c)]["rps"] for c in args.clients}
    env = {"python": platform.python_version(), "cpus": os.cpu_count(),
           "load_avg_before": load_before, "load_avg_after": load_after,
           "replica": "1 replica x 1 CPU per mode", "clients": "threads in the benchmark process",
           "seconds": args.seconds, "rounds": args.rounds, "warmup_s": args.warmup,
           "model_alone": cost}
    rows = [[s["mode"], str(s["clients"]), f"{s['rps']:.1f}", f"{s['p50_ms']:.1f}",
             f"{s['p99_ms']:.1f}", f"{s['requests_per_forward_pass']:.1f}", str(s["requests"]),
             str(s["errors"])] for s in summary]
    md = ("# Serve load: Ray Serve endpoint, batched vs unbatched\n\n"
          f"`python -m benchmarks.serve_load` — MiniLM (all-MiniLM-L6-v2 classifier), one "
          f"sentence per request, closed-loop clients on 127.0.0.1, {args.seconds:g} s per case "
          f"x {args.rounds} round(s) taking turns, 1 replica x 1 CPU per mode.\n\n"
          + markdown_table(["mode", "clients", "req/s", "p50 ms", "p99 ms",
                            "requests / forward pass", "requests", "errors"], rows)
          + "\nbatched / unbatched throughput: "
          + ", ".join(f"{c} client(s) {ratios[c]:.2f}x" for c in args.clients)
          + f"\n\nThe model alone (in process, 1 thread): {cost['batch_1_ms']:.1f} ms for one "
          f"sentence, {cost['batch_16_ms']:.1f} ms for 16 in one pass."
          + f"\n\nMachine: {os.cpu_count()} cores shared with other jobs (load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after); the client threads run on "
          f"the same cores as the server, so absolute numbers are pessimistic and noisy.\n")
    path = write_results("serve_load", {"env": env, "summary": summary,
                                        "batched_over_unbatched_rps": ratios}, md)
    print(md)
    print(f"written {path}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

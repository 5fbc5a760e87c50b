"""Training-loop overhead: ``trainers.fit`` vs a hand-written PyTorch loop vs Ray Train (1 worker).

All three train the same model on the same batches (the order comes from ``epoch_order``, so
padding lengths match) with the same optimizer, schedule, clipping and thread count. Step time
is steady state: the run is cut into windows of ``--window`` optimizer steps, the first window
(warm-up) is dropped and the rest are divided by their step count. ``fit`` and the Ray worker
time their windows themselves (``time_s`` of each metrics row, evaluations every window with no
validation set and no checkpoints, so a row costs one JSON line); the plain loop takes the same
clock readings. End-to-end wall time (data, model, training, test evaluation, and for Ray the
trainer/worker start-up) is reported apart; ``ray.init`` is timed once, on its own.

Cases take turns (A B C, A B C, ...) so load from other processes falls on all alike; medians.

    python -m benchmarks.train_overhead                 # ~8 min on 2 cores
    python -m benchmarks.train_overhead --repeats 1 --models mlp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, write_results
from trainers.config import RunConfig
from trainers.recipe import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
THREADS = 1  # one thread per process: shared, loaded cores make multi-thread timings erratic

# model -> (recipe, overrides, optimizer steps, window): MiniLM on 64 SST-2 shots, batch 16,
# for the real cost; the tiny MLP (sub-millisecond steps) exposes per-step framework cost
MODELS: dict[str, tuple[str, list[str], int, int]] = {
    "minilm": ("sst2-minilm.yaml", ["data.shots=32", "data.max_test=64", "train.batch_size=16"],
               24, 4),
    "mlp": ("tiny-digits.yaml", ["data.val_shots=0", "train.batch_size=32"], 6000, 1000),
}


def recipe(model: str, out: Path, *extra: str) -> RunConfig:
    name, overrides, steps, window = MODELS[model]
    return load_config(CONFIGS / name, [
        *overrides, f"train.max_steps={steps}", f"train.epochs={steps}",
        f"train.eval_every={window}", "train.save_checkpoints=false", "train.progress=false",
        f"train.num_threads={THREADS}", f"train.output_dir={out}", *extra])


def per_step(times: list[float], window: int) -> float:
    """Median seconds per step over the windows after the first (warm-up)."""
    spans = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(spans) / window


Clock = tuple[list[float], list[float] | None]  # wall and process-CPU seconds at each window


# --------------------------------------------------------------------------------------------
# The three ways to train


def plain_loop(cfg: RunConfig) -> Clock:
    """What one would write by hand: AdamW, linear warmup/decay, clipping; clock every window."""
    from trainers.data import load_dataset
    from trainers.batches import epoch_order
    from trainers.models import create_model

    torch.set_num_threads(THREADS)
    t, o = cfg.train, cfg.optim
    data = load_dataset(cfg.data)
    torch.manual_seed(t.seed)
    built = create_model(cfg.model, data.num_classes)
    model, tok = built.module, built.tokenizer
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name](
        model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    warm = int(round(o.warmup * t.max_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / max(warm, 1), max(0.0, (t.max_steps - s) / max(t.max_steps - warm, 1))))
    split = data.train
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)

    def inputs(split, idx: list[int]) -> dict[str, torch.Tensor]:
        if tok is None:
            return {"pixels": (split.inputs[torch.as_tensor(idx)] - mean) / std}
        enc = tok([split.inputs[i] for i in idx], padding=True, truncation=True,
                  max_length=cfg.data.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    model.train()
    step, epoch = 0, 0
    t0 = time.perf_counter()
    clock: list[float] = []
    cpu: list[float] = []
    while step < t.max_steps:
        order = epoch_order(len(split), t.seed + cfg.data.seed, epoch, 0, 1)
        for i in range(0, len(order), t.batch_size):
            idx = order[i:i + t.batch_size]
            loss = F.cross_entropy(model(**inputs(split, idx)), split.labels[torch.as_tensor(idx)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % t.eval_every == 0:
                clock.append(time.perf_counter() - t0)
                cpu.append(time.process_time())
            if step >= t.max_steps:
                break
        epoch += 1
    model.eval()
    with torch.no_grad():  # the test evaluation fit does too (end-to-end time)
        test = data.test
        for i in range(0, len(test), t.eval_batch_size):
            model(**inputs(test, list(range(i, min(i + t.eval_batch_size, len(test))))))
    return clock, cpu


def fit_loop(cfg: RunConfig) -> Clock:
    from trainers.loop import Hooks, fit

    cpu: list[float] = []
    result = fit(cfg, Hooks(on_evaluation=lambda row, ckpt: cpu.append(time.process_time())))
    return [row["time_s"] for row in result.history], cpu


def ray_one_worker(cfg: RunConfig) -> Clock:
    from cluster.train import train_distributed

    cfg = cfg.replace({"scaling.num_workers": 1, "scaling.cpus_per_worker": THREADS})
    result = train_distributed(cfg)
    rows = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["time_s"] for line in rows], None  # the worker's CPU is elsewhere


CASES: dict[str, Callable[[RunConfig], Clock]] = {
    "plain PyTorch loop": plain_loop, "trainers.fit": fit_loop, "Ray Train, 1 worker": ray_one_worker,
}


# --------------------------------------------------------------------------------------------


def run(models: list[str], repeats: int, out: Path) -> dict[str, Any]:
    from cluster.session import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start = time.perf_counter()
    ensure_ray(None, num_cpus=THREADS, log_to_driver=False)
    ray_init_s = time.perf_counter() - start
    results: dict[str, Any] = {}
    for model in models:
        _, _, steps, window = MODELS[model]
        step_s: dict[str, list[float]] = {c: [] for c in CASES}
        cpu_s: dict[str, list[float]] = {c: [] for c in CASES}
        wall_s: dict[str, list[float]] = {c: [] for c in CASES}
        for rep in range(repeats):
            for case, fn in CASES.items():  # interleaved: A B C, A B C, ...
                cfg = recipe(model, out / f"{model}-{rep}", f"train.run_name={case[:5]}-{rep}")
                t0 = time.perf_counter()
                clock, cpu = fn(cfg)
                wall_s[case].append(time.perf_counter() - t0)
                assert len(clock) == steps // window, (case, clock)
                step_s[case].append(per_step(clock, window))
                if cpu:
                    cpu_s[case].append(per_step(cpu, window))
                print(f"{model} rep {rep} {case}: {step_s[case][-1] * 1e3:.2f} ms/step"
                      + (f" ({cpu_s[case][-1] * 1e3:.2f} CPU)" if cpu else "")
                      + f", {wall_s[case][-1]:.1f} s end to end", flush=True)
        cpu_base = statistics.median(cpu_s["plain PyTorch loop"])
        base = statistics.median(step_s["plain PyTorch loop"])
        results[model] = {
            "steps": steps, "window": window, "measured_steps": steps - window,
            "cases": {c: {"step_ms": [s * 1e3 for s in step_s[c]],
                          "step_ms_median": statistics.median(step_s[c]) * 1e3,
                          "step_ms_best": min(step_s[c]) * 1e3,
                          "ratio_vs_plain": statistics.median(step_s[c]) / base,
                          "cpu_ms": [x * 1e3 for x in cpu_s[c]],
                          "cpu_ratio_vs_plain": (statistics.median(cpu_s[c]) / cpu_base
                                                 if cpu_s[c] else None),
                          "wall_s": wall_s[c], "wall_s_median": statistics.median(wall_s[c])}
                      for c in CASES}}
    return {"ray_init_s": ray_init_s, "models": results}


GOALS = {"trainers.fit": 1.03, "Ray Train, 1 worker": 1.10}


def markdown(payload: dict[str, Any]) -> str:
    rows = []
    for model, r in payload["models"].items():
        for case, c in r["cases"].items():
            goal = GOALS.get(case)
            verdict = "" if goal is None else (" ✓" if c["ratio_vs_plain"] <= goal else " ✗")
            rows.append([model, case, f"{c['step_ms_median']:.2f} ({c['step_ms_best']:.2f})",
                         f"{c['ratio_vs_plain']:.3f}x" + (f" (goal ≤ {goal:.2f}){verdict}"
                                                           if goal else ""),
                         "—" if c["cpu_ratio_vs_plain"] is None
                         else f"{c['cpu_ratio_vs_plain']:.3f}x",
                         f"{c['wall_s_median']:.1f}"])
    env = payload["env"]
    windows = ", ".join(f"{m}: {r['window']} steps" for m, r in payload["models"].items())
    return (
        "# Training-loop overhead: trainers.fit and Ray Train vs a plain PyTorch loop\n\n"
        f"Same model, batches (order), optimizer, schedule, clipping; {env['threads']} torch "
        f"threads; CPU. Step time = median over windows after the first (warm-up) of "
        f"{windows}; "
        f"{env['repeats']} interleaved repetitions, medians. The CPU column compares process "
        f"CPU time per step (in-process cases only), which contention from other processes "
        f"disturbs far less than wall time. End-to-end includes data, model, "
        f"test evaluation and, for Ray, trainer and worker start-up; `ray.init` took "
        f"{payload['ray_init_s']:.1f} s once, not included. Models: MiniLM (22.7 M params) on "
        f"64 SST-2 shots, batch 16, max length 64; MLP on 200 digits, batch 32. torch "
        f"{env['torch']}, {env['cpus']} CPU cores shared with other processes (1-min load "
        f"average {env['load_end']:.1f} at the end).\n\n"
        + markdown_table(["model", "how", "ms / step (best)", "vs plain (medians)", "CPU s / step vs plain",
                          "end to end (s)"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        payload = run(args.models, args.repeats, Path(tmp))
    import ray

    ray.shutdown()
    payload["env"] = {"threads": THREADS, "repeats": args.repeats, "torch": torch.__version__,
                      "cpus": os.cpu_count(), "python": platform.python_version(),
                      "load_end": os.getloadavg()[0]}
    print(write_results("train_overhead", payload, markdown(payload)).read_text())


if __name__ == "__main__":
    main()

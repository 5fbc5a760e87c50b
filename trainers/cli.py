"""`launch.py train` and `launch.py demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainers.config import RunConfig, load_config

PROJECT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = PROJECT / "configs" / "demo.yaml"


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe, e.g. configs/sst2-minilm.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")


def add_seeds_args(p: argparse.ArgumentParser) -> None:
    add_train_args(p)
    p.add_argument("--seeds", type=int, default=5, help="few-shot draws: data.seed = 0..N-1")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for the demo recipe")


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    vw = max(5, *(len(v) for _, v in rows))
    lines = [f"| {'metric'.ljust(width)} | {'value'.ljust(vw)} |",
             f"|{'-' * (width + 2)}|{'-' * (vw + 2)}|"]
    lines += [f"| {k.ljust(width)} | {v.ljust(vw)} |" for k, v in rows]
    return f"\n{title}\n" + "\n".join(lines)


def print_result(cfg: RunConfig, metrics: dict, run_dir: Path) -> None:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()
            if isinstance(v, (int, float))]
    print(format_table(rows, f"{cfg.name}: results (run folder {run_dir})"))


def train(cfg: RunConfig) -> dict:
    """Run one training: in this process, or on Ray Train when scaling.num_workers > 0."""
    if cfg.scaling.num_workers > 0:
        from cluster.train import train_distributed

        result = train_distributed(cfg)
        return result.metrics
    from trainers.loop import fit

    return fit(cfg).metrics


def run_train(args: argparse.Namespace) -> int:
    from trainers.stages import is_staged, load_stages

    if is_staged(args.recipe):  # each stage a run of its own, in order, each resumable
        for cfg in load_stages(args.recipe, args.overrides):
            print(f"== stage {cfg.name} (run folder {cfg.run_dir})", flush=True)
            print_result(cfg, train(cfg), cfg.run_dir)
        return 0
    cfg = load_config(args.recipe, args.overrides)
    metrics = train(cfg)
    print_result(cfg, metrics, cfg.run_dir)
    return 0


def mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_seeds(args: argparse.Namespace) -> int:
    """Train the recipe once per few-shot draw and report mean ± std of the test metrics."""
    import json

    base = load_config(args.recipe, args.overrides)
    if args.seeds < 1:
        from trainers.errors import ConfigError

        raise ConfigError(f"--seeds {args.seeds}: need at least 1")
    per_seed = []
    for seed in range(args.seeds):
        cfg = base.replace({"data.seed": seed, "train.run_name": f"{base.name}-{base.digest()}"
                                                                 f"-seed{seed}"})
        per_seed.append({"seed": seed, **train(cfg)})
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in per_seed[-1].items()
                                           if k.startswith("test/")), flush=True)
    keys = [k for k in per_seed[0] if k.startswith("test/")]
    summary = {k: mean_std([row[k] for row in per_seed]) for k in keys}
    rows = [(k, f"{m:.4f} ± {sd:.4f}") for k, (m, sd) in summary.items()]
    table = format_table(rows, f"{base.name}: test metrics over {args.seeds} few-shot seeds "
                               f"(K={base.data.shots} per class)")
    print(table)
    out = base.run_dir.parent / f"{base.name}-{base.digest()}-seeds.json"
    out.write_text(json.dumps({"recipe": args.recipe, "overrides": args.overrides,
                               "per_seed": per_seed,
                               "summary": {k: {"mean": m, "std": sd}
                                           for k, (m, sd) in summary.items()}}, indent=1))
    print(f"written {out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    cfg = load_config(DEMO_RECIPE, args.overrides)
    if cfg.tune.space:
        from cluster.cli import sweep_and_report

        return sweep_and_report(cfg, resume=False)
    metrics = train(cfg)
    print_result(cfg, metrics, cfg.run_dir)
    return 0



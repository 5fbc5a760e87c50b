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


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for the demo recipe")


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
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
    cfg = load_config(args.recipe, args.overrides)
    metrics = train(cfg)
    print_result(cfg, metrics, cfg.run_dir)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    cfg = load_config(DEMO_RECIPE, args.overrides)
    if cfg.tune.space:
        from cluster.cli import sweep_and_report

        return sweep_and_report(cfg, resume=False)
    metrics = train(cfg)
    print_result(cfg, metrics, cfg.run_dir)
    return 0



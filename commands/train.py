"""`launch.py train`, `launch.py seeds` and `launch.py demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from commands.common import add_recipe_args, format_table

PROJECT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = PROJECT / "configs" / "demo.yaml"


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_recipe_args(p)


def add_seeds_args(p: argparse.ArgumentParser) -> None:
    add_recipe_args(p)
    p.add_argument("--seeds", type=int, default=5, help="few-shot draws: data.seed = 0..N-1")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for the demo recipe")


def print_result(name: str, metrics: dict, run_dir: Path) -> None:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()
            if isinstance(v, (int, float))]
    print(format_table(rows, f"{name}: results (run folder {run_dir})"))


def run_train(args: argparse.Namespace) -> int:
    from cluster.run import train
    from trainers.recipe import load_config
    from trainers.stages import is_staged, load_stages

    if is_staged(args.recipe):  # each stage a run of its own, in order, each resumable
        for cfg in load_stages(args.recipe, args.overrides):
            print(f"== stage {cfg.name} (run folder {cfg.run_dir})", flush=True)
            print_result(cfg.name, train(cfg), cfg.run_dir)
        return 0
    cfg = load_config(args.recipe, args.overrides)
    print_result(cfg.name, train(cfg), cfg.run_dir)
    return 0


def run_seeds(args: argparse.Namespace) -> int:
    """Train the recipe once per few-shot draw and report mean ± std of the test metrics."""
    from cluster.run import evaluate_seeds
    from trainers import io
    from trainers.errors import ConfigError
    from trainers.recipe import load_config

    base = load_config(args.recipe, args.overrides)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: need at least 1")

    def report(row: dict) -> None:
        print(f"seed {row['seed']}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                  if k.startswith("test/")), flush=True)

    results = evaluate_seeds(
        base, args.seeds, on_seed=report,
        overrides=lambda s: {"train.run_name": f"{base.name}-{base.digest()}-seed{s}"})
    rows = [(k, results.text(k)) for k in results.summary]
    print(format_table(rows, f"{base.name}: test metrics over {args.seeds} few-shot seeds "
                             f"(K={base.data.shots} per class; mean ± {results.std_kind})"))
    out = io.write_json(base.run_dir.parent / f"{base.name}-{base.digest()}-seeds.json",
                        {"recipe": args.recipe, "overrides": args.overrides,
                         **results.to_dict()})
    print(f"written {out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from trainers.recipe import load_config

    cfg = load_config(DEMO_RECIPE, args.overrides)
    if cfg.tune.space:
        from commands.tune import sweep_and_report

        return sweep_and_report(cfg, resume=False)
    from cluster.run import train

    print_result(cfg.name, train(cfg), cfg.run_dir)
    return 0

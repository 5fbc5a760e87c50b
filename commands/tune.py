"""`launch.py tune` and `launch.py report` (Ray is imported only once a command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from commands.common import add_recipe_args

if TYPE_CHECKING:
    from trainers.config import RunConfig


def add_tune_args(p: argparse.ArgumentParser) -> None:
    add_recipe_args(p, "YAML recipe with a tune section, e.g. configs/sst2-minilm-sweep.yaml",
                    "dotted key=value overrides, e.g. tune.num_samples=16 tune.name=try2")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep of the same name (finished trials are "
                   "kept, unfinished ones rerun)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing sweep folder of the same name and start over")
    p.add_argument("--retry-errored", action="store_true",
                   help="with --resume: also rerun trials that ended in an error")
    p.add_argument("--no-report", action="store_true",
                   help="skip the report (leaderboard, plots, final test of the best config)")


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", help="a sweep folder, e.g. runs/sweeps/sst2-minilm-sweep")
    p.add_argument("--no-final", action="store_true",
                   help="skip the final test-set evaluation of the best config")
    p.add_argument("--top", type=int, default=5, help="trials in the printed leaderboard")


def sweep_and_report(cfg: RunConfig, *, resume: bool = False, overwrite: bool = True,
                     retry_errored: bool = False, report: bool = True) -> int:
    """Run the sweep of ``cfg``, then write and print its report.

    The defaults suit ``launch.py demo``: a rerun starts the demo sweep afresh instead of
    failing on the folder the previous run left (``launch.py tune`` asks for --overwrite).
    """
    from cluster.tune import run_sweep

    outcome = run_sweep(cfg, resume=resume, overwrite=overwrite, retry_errored=retry_errored)
    print(f"\nsweep finished: {outcome.trials} trial(s), {outcome.errors} with errors; "
          f"folder {outcome.sweep_dir}", flush=True)
    if not report:
        return 0
    return _report(outcome.sweep_dir, final=True, top=5)


def _report(sweep_dir: Path, *, final: bool, top: int) -> int:
    from cluster.report import summary_text, write_report

    rep = write_report(sweep_dir, final=final)
    print(summary_text(rep, top=top), flush=True)
    return 0 if rep.rows else 1


def run_tune(args: argparse.Namespace) -> int:
    from trainers.errors import ConfigError
    from trainers.recipe import load_config

    cfg = load_config(args.recipe, args.overrides)
    if args.retry_errored and not args.resume:
        raise ConfigError("--retry-errored only applies with --resume")
    return sweep_and_report(cfg, resume=args.resume, overwrite=args.overwrite,
                            retry_errored=args.retry_errored, report=not args.no_report)


def run_report(args: argparse.Namespace) -> int:
    return _report(Path(args.sweep_dir), final=not args.no_final, top=args.top)

"""`launch.py evaluate MODEL DATA`: the training metrics on labelled data, and a confusion PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder, a sweep's best/ folder or an exported folder")
    p.add_argument("data", help="text: a labelled TSV/CSV/JSONL file or a dataset folder "
                   "(its test split); images: a folder of class folders or a dataset root")
    p.add_argument("--out", help="folder for metrics.json and confusion.png (default "
                   "<model>/evaluation/<data name>)")
    p.add_argument("--text-column", help="default: the recipe's data.text_column")
    p.add_argument("--label-column", help="default: the recipe's data.label_column")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_evaluate(args: argparse.Namespace) -> int:
    from trainers.errors import ConfigError
    from trainers.evaluation import evaluate_model, metrics_table
    from trainers.predictor import load_predictor

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    predictor = load_predictor(args.model)
    out = Path(args.out) if args.out else (
        Path(args.model) / "evaluation" / Path(args.data.rstrip("/")).stem)
    result = evaluate_model(predictor, args.data, out, batch_size=args.batch_size,
                            progress=not args.no_progress, text_column=args.text_column,
                            label_column=args.label_column)
    print(f"{args.model} on {args.data} ({result['examples']} examples)\n")
    print(metrics_table(result))
    print(f"\nwritten {out / 'metrics.json'} and {out / 'confusion.png'}")
    return 0

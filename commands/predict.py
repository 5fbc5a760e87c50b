"""`launch.py predict MODEL INPUT`: labels and class probabilities for new data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder, a sweep's best/ folder or an exported folder")
    p.add_argument("input", help="text models: a TSV/CSV/JSONL file, or - for one text per line "
                   "on stdin; image models: an image folder (searched recursively) or one image")
    p.add_argument("--out", help="write here instead of stdout (.jsonl: JSON lines, else TSV)")
    p.add_argument("--format", choices=("tsv", "jsonl"), help="output format (default: from "
                   "--out's suffix, else tsv)")
    p.add_argument("--text-column", help="column holding the text (default: the recipe's "
                   "data.text_column)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_predict(args: argparse.Namespace) -> int:
    from trainers.errors import ConfigError
    from trainers.predictor import (
        Predictor,
        locate_model,
        prediction_rows,
        read_inputs,
        write_predictions,
    )

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    source = locate_model(args.model)
    inputs, ids = read_inputs(args.input, source, args.text_column)
    predictor = Predictor(source)
    probs = predictor.predict(inputs, batch_size=args.batch_size,
                              progress=not args.no_progress)
    rows = prediction_rows(probs, ids, predictor.classes)
    fmt = args.format or ("jsonl" if args.out and args.out.endswith(".jsonl") else "tsv")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            write_predictions(rows, f, fmt)
        tmp.replace(out)
        print(f"{len(rows)} prediction(s) written to {out}", file=sys.stderr)
    else:
        write_predictions(rows, sys.stdout, fmt)
    return 0

"""`launch.py export MODEL --format hf|onnx|torchscript --out DIR`."""

from __future__ import annotations

import argparse


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder or a sweep's best/ folder")
    p.add_argument("--format", required=True, choices=("hf", "onnx", "torchscript"),
                   help="hf: Hugging Face folder (+ sentence-transformers body), text models; "
                   "onnx: any model; torchscript: image models")
    p.add_argument("--out", required=True, help="folder to write (created; must be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run_export(args: argparse.Namespace) -> int:
    from trainers.export import PARITY_GOAL, export_model

    rec = export_model(args.model, args.format, args.out, overwrite=args.overwrite)
    diff = rec.get("max_abs_diff")
    print(f"exported {args.model} as {args.format} to {args.out}")
    if "load_with" in rec:
        print(f"load it with: {rec['load_with'].replace('DIR', repr(args.out))}")
    if diff is not None:
        verdict = "within" if diff <= PARITY_GOAL else "ABOVE"
        print(f"max |logit difference| vs the PyTorch model on probe inputs: {diff:.2e} "
              f"({verdict} the {PARITY_GOAL:g} goal)")
    print(f"source checkpoint sha256 {rec['source_sha256']}")
    return 0

"""smallshot command line: parse, load the config, call one function.

    python launch.py train configs/sst2-minilm.yaml optim.lr=3e-4 data.shots=8
    python launch.py tune configs/sst2-minilm-sweep.yaml --resume
    python launch.py --help
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each subcommand lives next to the code it drives: "module:function" builds its parser and
# returns the function to call. Imports are lazy so `--help` and config errors stay instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("trainers.cli", "Train one run: locally, or on Ray Train when scaling.num_workers > 0"),
    "seeds": ("trainers.cli", "Train once per few-shot seed and report mean ± std of test metrics"),
    "demo": ("trainers.cli", "The embedded default: a small MiniLM sweep on SST-2, then its report"),
    "tune": ("cluster.cli", "Run a Ray Tune sweep described by the recipe's tune section"),
    "report": ("cluster.cli", "Leaderboard, plots and best-config export of a sweep folder"),
    "submit": ("cluster.jobs", "Submit a recipe to a running Ray cluster (Ray Jobs API)"),
    "status": ("cluster.jobs", "Status of a submitted job"),
    "logs": ("cluster.jobs", "Logs of a submitted job (--follow to tail)"),
    "stop": ("cluster.jobs", "Stop a submitted job"),
    "list": ("cluster.jobs", "Jobs submitted from this machine"),
    "augment-preview": ("augment.preview", "Write a grid (images) or table (text) of augmentations"),
    "predict": ("commands.predict", "Labels and probabilities for new texts or images"),
    "evaluate": ("commands.evaluate", "Metrics and a confusion matrix on labelled data"),
    "export": ("commands.export", "Write a model as an HF folder, ONNX or TorchScript"),
    "serve": ("commands.serve", "An HTTP JSON endpoint on Ray Serve (POST /predict)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py", description="smallshot: few-shot fine-tuning with Ray Train and Ray Tune",
        epilog="Overrides are dotted key=value pairs, e.g. optim.lr=3e-4 data.shots=8.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        add = getattr(_load(module), f"add_{name.replace('-', '_')}_args", None)
        if add is not None:
            add(p)
    return parser


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:  # only a missing subcommand module itself is tolerated
        if e.name != module:
            raise
        return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: weights are local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`submit r.yaml --mode train optim.lr=1e-3`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                    for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.command:
        parser.print_help()
        return 2
    from trainers.errors import SmallshotError

    run = getattr(importlib.import_module(args._module), f"run_{args.command.replace('-', '_')}")
    try:
        return int(run(args) or 0)
    except SmallshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

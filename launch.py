"""smallshot command line: parse, then hand over to ``commands.<module>.run_<command>``.

    python launch.py train configs/sst2-minilm.yaml optim.lr=3e-4 data.shots=8
    python launch.py tune configs/sst2-minilm-sweep.yaml --resume
    python launch.py --help
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from commands import COMMANDS


def _module(name: str):
    return importlib.import_module(f"commands.{COMMANDS[name][0]}")


def _attr(name: str, kind: str):
    """``add_<name>_args`` (kind "add") or ``run_<name>`` (kind "run") of a command."""
    attr = name.replace("-", "_")
    return getattr(_module(name), f"add_{attr}_args" if kind == "add" else f"run_{attr}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py", description="smallshot: few-shot fine-tuning with Ray Train and Ray Tune",
        epilog="Overrides are dotted key=value pairs, e.g. optim.lr=3e-4 data.shots=8.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        _attr(name, "add")(sub.add_parser(name, help=help_text, description=help_text))
    return parser


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

    try:
        return int(_attr(args.command, "run")(args) or 0)
    except SmallshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

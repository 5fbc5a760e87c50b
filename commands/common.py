"""Argument groups and output formatting shared by several commands."""

from __future__ import annotations

import argparse


def add_recipe_args(p: argparse.ArgumentParser, recipe_help: str | None = None,
                    overrides_help: str | None = None) -> None:
    p.add_argument("recipe", help=recipe_help or "YAML recipe, e.g. configs/sst2-minilm.yaml")
    p.add_argument("overrides", nargs="*",
                   help=overrides_help or "dotted key=value overrides, e.g. optim.lr=3e-4")


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    """A two-column markdown table (metric | value) under ``title``."""
    width = max(len(k) for k, _ in rows)
    vw = max(5, *(len(v) for _, v in rows))
    lines = [f"| {'metric'.ljust(width)} | {'value'.ljust(vw)} |",
             f"|{'-' * (width + 2)}|{'-' * (vw + 2)}|"]
    lines += [f"| {k.ljust(width)} | {v.ljust(vw)} |" for k, v in rows]
    return f"\n{title}\n" + "\n".join(lines)

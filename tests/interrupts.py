"""A crash stand-in for resume tests: fit's evaluation hook raises once a row reaches a point."""

from __future__ import annotations


class Interrupt(Exception):
    """Stands in for a crash right after an evaluation and its checkpoint."""


def interrupted_at(value: float, key: str = "step"):
    """Hooks that raise Interrupt after the first evaluation whose ``row[key] >= value``."""
    from trainers.loop import Hooks

    def stop(row, _ckpt):
        if row[key] >= value:
            raise Interrupt
    return Hooks(on_evaluation=stop)

"""Where a run's wall time goes: ``Laps.mark(phase)`` charges the time since the last mark."""

from __future__ import annotations

import time


class Laps:
    """Seconds per phase of one run (data, model, strategy, train, evaluate, checkpoints, ...).

    Marks are one line each at phase boundaries, so a loop that alternates phases (steps,
    evaluations, checkpoint writes) adds up each phase over the run.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}

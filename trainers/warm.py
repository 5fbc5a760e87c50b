"""What a warm process keeps between runs: the loaded dataset and the pretrained weights.

A Tune runner that trains trial after trial (``reuse_actors``), a ``launch.py seeds`` loop, or
the k folds of one trial would otherwise read the same files and rebuild the same pretrained
model for every run. ``keep`` builds a value once per process and hands out the same object
after; callers copy what a run may change (models are deep-copied per run, never trained in
place). One entry per kind, so a process holds at most one dataset and one pretrained model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

_ENTRIES: dict[str, tuple[Hashable, Any]] = {}
HITS: Counter[str] = Counter()  # kind -> times a run was served from memory (tests, benchmarks)
MISSES: Counter[str] = Counter()


def keep(kind: str, key: Hashable, build: Callable[[], T]) -> T:
    """The value of ``build()`` for ``key``, built once per process (one ``key`` per kind)."""
    entry = _ENTRIES.get(kind)
    if entry is not None and entry[0] == key:
        HITS[kind] += 1
        return entry[1]
    _ENTRIES.pop(kind, None)  # let the previous value go before building the next one
    MISSES[kind] += 1
    value = build()
    _ENTRIES[kind] = (key, value)
    return value


def forget() -> None:
    """Drop everything kept (the next run loads from disk again)."""
    _ENTRIES.clear()

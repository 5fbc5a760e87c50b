"""N-way K-shot episodes for metric learning, and 90-degree rotations as new classes.

An episode is one micro batch laid out class-major: ``ways * shots`` support indices (class
0's shots first), then ``ways * queries`` query indices in the same class order. Episodes are
a pure function of (seed, epoch, episode number): a resumed run draws exactly the episodes an
uninterrupted one would have drawn. Classes are stratified like the few-shot sampler's draw:
each epoch walks a fresh permutation of the classes ``ways`` at a time, so every class takes
part equally often, and within a class the examples are drawn without replacement.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainers.errors import DataError


@dataclass(frozen=True)
class EpisodeShape:
    ways: int
    shots: int
    queries: int

    @property
    def size(self) -> int:
        return self.ways * (self.shots + self.queries)

    def query_targets(self, device: torch.device | None = None) -> torch.Tensor:
        """Episode-local labels of the queries (0..ways-1, class-major)."""
        return torch.arange(self.ways, device=device).repeat_interleave(self.queries)


class EpisodeSampler:
    """Seeded, class-stratified episodes over a labelled split."""

    def __init__(self, labels: Sequence[int], shape: EpisodeShape, seed: int):
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(labels):
            by_class[int(y)].append(i)
        self.classes = sorted(by_class)
        self.by_class = by_class
        self.shape = shape
        self.seed = seed
        need = shape.shots + shape.queries
        if shape.ways > len(self.classes):
            raise DataError(f"episodes: {shape.ways}-way episodes need at least {shape.ways} "
                            f"classes, the training split has {len(self.classes)}")
        small = [c for c in self.classes if len(by_class[c]) < need]
        if small:
            raise DataError(f"episodes: {shape.shots} shots + {shape.queries} queries need "
                            f"{need} examples per class; class {small[0]} has "
                            f"{len(by_class[small[0]])} ({len(small)} classes too small)")

    def epoch(self, epoch: int, episodes: int) -> list[list[int]]:
        """The ``episodes`` episodes of one epoch (shared by every rank)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order: list[int] = []
        out = []
        for _ in range(episodes):
            while len(set(order)) < self.shape.ways:  # queue up the next pass over the classes
                fresh = self.classes[:]
                rng.shuffle(fresh)
                order += fresh
            chosen: list[int] = []
            rest: list[int] = []
            for c in order:  # the first `ways` distinct classes; repeats wait for the next one
                (chosen if len(chosen) < self.shape.ways and c not in chosen else rest).append(c)
            order = rest
            support, query = [], []
            for c in chosen:
                picked = rng.sample(self.by_class[c], self.shape.shots + self.shape.queries)
                support += picked[: self.shape.shots]
                query += picked[self.shape.shots:]
            out.append(support + query)
        return out


def epoch_episodes(sampler: EpisodeSampler, epoch: int, episodes: int, rank: int,
                   world_size: int) -> list[list[int]]:
    """This rank's share of an epoch's episodes (strided, padded so all ranks step together)."""
    eps = sampler.epoch(epoch, episodes)
    if world_size > 1:
        eps += eps[: (-len(eps)) % world_size]
        eps = eps[rank::world_size]
    return eps


# --------------------------------------------------------------------------------------------
# Rotations as classes


def rotated_classes(images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                    sources: list[str] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Add copies rotated by 90, 180 and 270 degrees, each rotation a class of its own.

    A character turned by 90 degrees is not the same character, so the rotated copies are new
    classes (label ``c + k * C`` for rotation ``k``): 4x the classes for metric learning.
    """
    n_classes = len(classes)
    xs, ys, srcs = [images], [labels], list(sources or [])
    names = list(classes)
    for k in (1, 2, 3):
        xs.append(torch.rot90(images, k, dims=(-2, -1)))
        ys.append(labels + k * n_classes)
        names += [f"{c}@rot{90 * k}" for c in classes]
        srcs += [f"{s}@rot{90 * k}" for s in (sources or [])]
    return torch.cat(xs), torch.cat(ys), names, srcs

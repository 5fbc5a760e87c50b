"""Run a config: in this process, or on Ray Train when ``scaling.num_workers > 0``; and the
multi-seed evaluation (one run per few-shot draw, test metrics as mean ± sample std).

Every command that trains (``train``, ``seeds``, ``demo``, the sweep report's final test,
the benchmarks) goes through these two functions, so "± std" means one thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainers.config import RunConfig
from trainers.metrics import STD_KIND, mean_std


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` once and return its final metrics (test/* when the test split is on)."""
    if cfg.scaling.num_workers > 0:
        from cluster.train import train_distributed

        return train_distributed(cfg).metrics
    from trainers.loop import fit

    return fit(cfg).metrics


@dataclass
class SeedResults:
    """The runs of one config over few-shot seeds 0..n-1 and the summary of their test metrics."""

    per_seed: list[dict[str, Any]]  # {"seed": s, **final metrics of that run}
    summary: dict[str, dict[str, float]]  # test/<metric> -> {"mean": ..., "std": ...}
    std_kind: str = STD_KIND

    def text(self, key: str, digits: int = 4) -> str:
        s = self.summary[key]
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"

    def to_dict(self) -> dict[str, Any]:
        return {"per_seed": self.per_seed, "summary": self.summary, "std": self.std_kind}


def summarise(per_seed: list[dict[str, Any]], prefix: str = "test/") -> dict[str, dict[str, float]]:
    keys = sorted({k for row in per_seed for k in row if k.startswith(prefix)
                   and isinstance(row[k], (int, float))})
    out = {}
    for k in keys:
        mean, std = mean_std([row[k] for row in per_seed if k in row])
        out[k] = {"mean": mean, "std": std}
    return out


def evaluate_seeds(cfg: RunConfig, seeds: int, *,
                   overrides: Callable[[int], dict[str, Any]] | None = None,
                   on_seed: Callable[[dict[str, Any]], None] | None = None,
                   source: str = "seeds") -> SeedResults:
    """Train ``cfg`` with ``data.seed`` = 0..seeds-1 (plus ``overrides(seed)``, e.g. a run
    name per seed) and summarise the test metrics as mean ± sample std."""
    per_seed = []
    for seed in range(seeds):
        run = cfg.replace({"data.seed": seed, **(overrides(seed) if overrides else {})},
                          source=f"{source} (seed {seed})")
        per_seed.append({"seed": seed, **train(run)})
        if on_seed is not None:
            on_seed(per_seed[-1])
    return SeedResults(per_seed, summarise(per_seed))

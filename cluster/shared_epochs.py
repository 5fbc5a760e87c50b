"""A k-fold grid's ``train.epochs`` axis, scored from one run per fold.

Grid points that differ only in ``train.epochs`` repeat each other's first epochs: after its
first 5 epochs, a run of 10 stands exactly where a run of 5 ends, as long as nothing in those
epochs depends on how many follow. So a k-fold grid sweep over ``train.epochs: grid[0, 10]``
runs one trial per point of the rest of the grid. Each fold trains the most epochs, and the
validation metric is read after each listed count (0: before the first step). The report then
lists every (point, count) with its own CV mean ± std, as if each had been its own trial.

Why it is exact, and what is checked before Ray starts (otherwise each count is its own trial):
- the LR of a step does not depend on the total: optim.schedule constant, optim.warmup 0;
- nothing ends a run by steps or patience: train.eval_every 0, no train.max_steps, no
  train.patience;
- the shuffle of epoch e and the RNG of step s come from (seed, e) and (seed, s)
  (trainers/batches.py), and an evaluation changes nothing a later step reads.
"""

from __future__ import annotations

import math
from typing import Any

from cluster.space import Conditional, Dist, SearchSpace
from trainers.config import RunConfig
from trainers.errors import TrainingError

FIELD = "train.epochs"


def metric_at(metric: str, epochs: int) -> str:
    """The name a shared trial reports ``metric`` under, read after ``epochs`` epochs."""
    return f"{metric}@epochs={epochs}"


def shared_counts(cfg: RunConfig, space: SearchSpace) -> tuple[tuple[int, ...] | None, str]:
    """The epoch counts one trial scores, or None and (when the recipe asked for sharing and
    the space has the axis) why every count is its own trial."""
    dim = space.dims.get(FIELD)
    if not (cfg.tune.share_epochs and cfg.data.folds > 1 and dim is not None):
        return None, ""
    grid = cfg.tune.search == "grid"
    if not (isinstance(dim, Dist) and (dim.kind == "grid" or (grid and dim.kind == "choice"))):
        return None, f"{FIELD}: a trial per value (sharing takes grid[...] values)"
    counts = tuple(sorted(set(dim.args)))
    if len(counts) < 2:
        return None, ""
    t, o = cfg.train, cfg.optim
    # fields whose value (or search) would make the first epochs depend on the total
    set_here = {"optim.schedule": o.schedule != "constant", "optim.warmup": o.warmup != 0,
                "train.eval_every": bool(t.eval_every), "train.max_steps": bool(t.max_steps),
                "train.patience": bool(t.patience)}
    why = [f for f, bad in set_here.items() if bad or f in space.dims]
    why += [name for name, d in space.dims.items() if isinstance(d, Conditional) and d.by == FIELD]
    if why:
        return None, (f"{FIELD}: a trial per value, since {', '.join(why)} make(s) the first "
                      f"epochs depend on the total (shared needs optim.schedule=constant, "
                      f"optim.warmup=0, no eval_every/max_steps/patience)")
    return counts, ""


def trial_space(space: SearchSpace) -> SearchSpace:
    """The space Tune enumerates when the epochs are shared: the rest of the grid."""
    return SearchSpace({k: v for k, v in space.dims.items() if k != FIELD})


def trial_base(cfg: RunConfig, counts: tuple[int, ...]) -> RunConfig:
    """The config a shared trial trains: the most epochs, evaluated before the first step
    too when 0 is a count."""
    return cfg.replace({FIELD: max(counts),
                        "train.eval_at_start": cfg.train.eval_at_start or 0 in counts},
                       source=f"{FIELD} shared by one trial ({', '.join(map(str, counts))})")


def scores_at(history: list[dict[str, Any]], counts: tuple[int, ...] | list[int],
              metric: str) -> dict[int, float]:
    """``metric`` of one fold's run after each count of epochs (its evaluation rows)."""
    out: dict[int, float] = {}
    for e in counts:
        row = next((h for h in history if math.isclose(float(h.get("epoch", -1)), e,
                                                         abs_tol=1e-6) and metric in h), None)
        if row is None:
            raise TrainingError(f"{FIELD} shared: the fold's run has no {metric} after {e} "
                                f"epoch(s) (it evaluated after "
                                f"{[h.get('epoch') for h in history]})")
        out[e] = float(row[metric])
    return out

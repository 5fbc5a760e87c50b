"""Ray Tune sweeps: search spaces from YAML, search/scheduler registries and the trial driver.

A recipe's ``tune.space`` maps dotted RunConfig fields to distributions written as strings:

    choice[sgd, momentum, adam]   one of the values (enumerated under ``tune.search: grid``)
    grid[8, 16]                   every value is run (x num_samples); a categorical for Optuna
    uniform[0, 0.3]               quniform[0, 0.3, 0.05]
    loguniform[1e-5, 1e-1]        qloguniform[1e-4, 1e-1, 1e-4]
    randint[1, 4]                 integers 1..4, both ends included; lograndint[8, 256]

A conditional distribution depends on the value of a categorical field of the same space:

    optim.lr: {by: optim.name, sgd: "loguniform[1e-3, 1e-1]", default: "loguniform[1e-5, 1e-3]"}

Random and grid search resolve it with ``tune.sample_from`` after ``by`` is drawn; Optuna gets a
define-by-run space where each branch is its own parameter (``optim.lr@sgd``), so TPE models the
branches apart. The whole space is validated before Ray starts: every field path, every
distribution's bounds, and every value a distribution can produce is built into a RunConfig
(plus the optimizer/model registries), so a bad space fails at once, naming the field.

Each trial is a driver function (``run_trial``): it turns its sampled values into a RunConfig
with ``train.test=false`` (selection never sees test labels) and trains in the trial process
(``scaling.num_workers=0``) or through a TorchTrainer of ``num_workers`` workers. It reports
every evaluation, so ASHA can stop it (time attribute ``training_iteration``).

With ``data.folds = k > 1`` a trial runs the folds one after another (fold i validates, the
rest train) and reports after each fold: ``<metric>`` = the running mean of the folds' last
evaluation, ``<metric>_std`` their spread, ``fold`` = folds done, so ``training_iteration`` is
the fold count and ASHA compares trials on the same number of folds (a trial it stops after
fold 1 was worse on that fold than its peers). Folds run sequentially rather than in lockstep
so that one process (and one GPU) suffices per trial.
"""

from __future__ import annotations

import gc
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from trainers import io
from trainers.checks import check_names
from trainers.config import RunConfig, from_dict
from trainers.errors import ConfigError
from trainers.metrics import final_row, mean_std, numeric
from trainers.registry import Registry

COND_SEP = "@"  # optim.lr@sgd: the sgd branch of a conditional optim.lr (Optuna parameter)
TRIAL_RECORD = "trial.json"
SWEEP_RECORD = "sweep.yaml"
# Fields a sweep may not search: they decide where/how the sweep runs, not what a trial learns.
UNSEARCHABLE = ("tune.", "scaling.", "train.output_dir", "train.run_name", "train.test",
                "train.resume", "train.progress", "data.fold", "data.folds", "name")


# --------------------------------------------------------------------------------------------
# Distributions


@dataclass(frozen=True)
class DistSpec:
    """One distribution kind: its arguments, checks and its Tune / Optuna forms."""

    arity: tuple[int, int]
    categorical: bool
    check: Callable[[tuple], str | None]
    probes: Callable[[tuple], list]  # values worth building a RunConfig with
    tune: Callable[[tuple], Any]
    optuna: Callable[[Any, str, tuple], Any]


def _num(args: tuple) -> str | None:
    bad = [a for a in args if isinstance(a, bool) or not isinstance(a, (int, float))]
    return f"expected numbers, got {bad[0]!r}" if bad else None


def _ints(args: tuple) -> str | None:
    bad = [a for a in args if isinstance(a, bool) or not isinstance(a, int)]
    return f"expected integers, got {bad[0]!r}" if bad else None


def _range(args: tuple, *, log: bool = False, q: bool = False, ints: bool = False) -> str | None:
    problem = (_ints if ints else _num)(args)
    if problem:
        return problem
    lo, hi = args[0], args[1]
    if log and lo <= 0:
        return f"lower bound {lo:g} must be > 0 for a log scale"
    if lo >= hi:
        return f"lower bound {lo:g} must be below the upper bound {hi:g}"
    if q and args[2] <= 0:
        return f"step q={args[2]:g} must be > 0"
    return None


def _categories(args: tuple) -> str | None:
    seen = []
    for a in args:
        if a in seen:
            return f"value {a!r} is listed twice"
        seen.append(a)
    return None


def _inside(lo: float, hi: float, log: bool = False) -> float:
    """A non-round interior point: it shows when a float range feeds an integer field."""
    if log:
        return math.exp(math.log(lo) + 0.37 * (math.log(hi) - math.log(lo)))
    return lo + 0.37 * (hi - lo)


def _qround(value: float, q: float) -> float:
    return round(round(value / q) * q, 12)


def _tune():
    from ray import tune

    return tune


def _optuna_categorical(trial: Any, name: str, args: tuple) -> Any:
    return trial.suggest_categorical(name, list(args))


DISTRIBUTIONS: Registry[DistSpec] = Registry("distribution", "tune.space")
for _name, _spec in {
    "choice": DistSpec((1, 10_000), True, _categories, lambda a: list(a),
                       lambda a: _tune().choice(list(a)), _optuna_categorical),
    "grid": DistSpec((1, 10_000), True, _categories, lambda a: list(a),
                     lambda a: _tune().grid_search(list(a)), _optuna_categorical),
    "uniform": DistSpec((2, 2), False, _range, lambda a: [a[0], a[1], _inside(a[0], a[1])],
                        lambda a: _tune().uniform(*a),
                        lambda t, n, a: t.suggest_float(n, a[0], a[1])),
    "quniform": DistSpec((3, 3), False, lambda a: _range(a, q=True),
                         lambda a: [a[0], a[1], _qround(_inside(a[0], a[1]), a[2])],
                         lambda a: _tune().quniform(*a),
                         lambda t, n, a: t.suggest_float(n, a[0], a[1], step=a[2])),
    "loguniform": DistSpec((2, 2), False, lambda a: _range(a, log=True),
                           lambda a: [a[0], a[1], _inside(a[0], a[1], log=True)],
                           lambda a: _tune().loguniform(*a),
                           lambda t, n, a: t.suggest_float(n, a[0], a[1], log=True)),
    "qloguniform": DistSpec((3, 3), False, lambda a: _range(a, log=True, q=True),
                            lambda a: [a[0], a[1], _qround(_inside(a[0], a[1], log=True), a[2])],
                            lambda a: _tune().qloguniform(*a),
                            lambda t, n, a: _qround(t.suggest_float(n, a[0], a[1], log=True),
                                                    a[2])),
    # inclusive upper bound, like Python's random.randint (Tune's own excludes it)
    "randint": DistSpec((2, 2), False, lambda a: _range(a, ints=True),
                        lambda a: [a[0], a[1], (a[0] + a[1]) // 2],
                        lambda a: _tune().randint(a[0], a[1] + 1),
                        lambda t, n, a: t.suggest_int(n, a[0], a[1])),
    "lograndint": DistSpec((2, 2), False, lambda a: _range(a, log=True, ints=True),
                           lambda a: [a[0], a[1], round(math.sqrt(a[0] * a[1]))],
                           lambda a: _tune().lograndint(a[0], a[1] + 1),
                           lambda t, n, a: t.suggest_int(n, a[0], a[1], log=True)),
}.items():
    DISTRIBUTIONS.register(_name, _spec)


@dataclass(frozen=True)
class Dist:
    kind: str
    args: tuple

    @property
    def spec(self) -> DistSpec:
        return DISTRIBUTIONS.get(self.kind)

    @property
    def categorical(self) -> bool:
        return self.spec.categorical

    def to_tune(self, grid: bool = False) -> Any:
        if grid and self.kind == "choice":
            return DISTRIBUTIONS.get("grid").tune(self.args)
        return self.spec.tune(self.args)

    def suggest(self, trial: Any, name: str) -> Any:
        return self.spec.optuna(trial, name, self.args)

    def __str__(self) -> str:
        return f"{self.kind}[{', '.join(map(str, self.args))}]"


@dataclass(frozen=True)
class Conditional:
    """A distribution chosen by the value of another (categorical) field."""

    by: str
    cases: tuple[tuple[Any, Dist], ...]
    default: Dist | None

    def branch(self, value: Any) -> tuple[str, Dist]:
        for case, dist in self.cases:
            if case == value:
                return str(case), dist
        if self.default is None:  # validation makes this unreachable
            raise ConfigError(f"conditional on {self.by}: no branch for {value!r}")
        return "default", self.default

    def sample(self, config: dict[str, Any], rng: Any = None) -> Any:
        """Draw from the branch of the already drawn ``by`` value."""
        _, dist = self.branch(config[self.by])
        return dist.to_tune().sample(random_state=rng)


@dataclass
class SeededConditional:
    """``tune.sample_from`` callable with its own seeded generator: Ray hands sample_from
    functions no random state, so without one a seeded sweep would not repeat itself."""

    dim: Conditional
    rng: Any

    def __call__(self, config: dict[str, Any]) -> Any:
        return self.dim.sample(config, self.rng)


_DIST_RE = re.compile(r"^\s*([A-Za-z_]+)\s*\[(.*)\]\s*$", re.S)
_EXPONENT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def parse_dist(text: Any, where: str) -> Dist:
    """'loguniform[1e-5, 1e-1]' -> Dist('loguniform', (1e-05, 0.1)), or a ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected a distribution like 'choice[a, b]' or "
                          f"'loguniform[1e-5, 1e-1]', got {text!r}")
    m = _DIST_RE.match(text)
    if not m:
        raise ConfigError(f"{where}: {text!r} is not of the form name[arguments], e.g. "
                          f"'loguniform[1e-5, 1e-1]'")
    kind = m.group(1).lower()
    spec = DISTRIBUTIONS.get(kind, field=where)
    try:
        args = yaml.safe_load(f"[{m.group(2)}]")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot read the arguments of {text!r}") from None
    if not spec.categorical:
        args = [_as_number(a) for a in args]
    else:  # grid[1e-3, 1e-2] means numbers, though YAML 1.1 reads exponents without a dot as text
        args = [_as_number(a) if isinstance(a, str) and _EXPONENT_RE.match(a) else a
                for a in args]
    lo, hi = spec.arity
    if not lo <= len(args) <= hi:
        want = f"{lo}" if lo == hi else f"at least {lo}"
        raise ConfigError(f"{where}: {kind} takes {want} argument(s), got {len(args)} in {text!r}")
    args = tuple(args)
    problem = spec.check(args)
    if problem:
        raise ConfigError(f"{where}: {text!r}: {problem}")
    return Dist(kind, args)


def _as_number(a: Any) -> Any:
    """YAML 1.1 reads '1e-5' as a string; numeric distributions take it as the number."""
    if isinstance(a, str):
        try:
            f = float(a)
        except ValueError:
            return a
        return int(f) if f.is_integer() and "." not in a and "e" not in a.lower() else f
    return a


# --------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class SearchSpace:
    """The validated ``tune.space``: field -> Dist | Conditional, unconditional ones first."""

    dims: dict[str, Dist | Conditional]

    @property
    def fields(self) -> list[str]:
        return list(self.dims)

    @property
    def conditional(self) -> bool:
        return any(isinstance(d, Conditional) for d in self.dims.values())

    def param_space(self, grid: bool = False, seed: int = 0) -> dict[str, Any]:
        """Tune's param_space for random/grid search (``grid`` enumerates choices)."""
        import numpy as np

        tune = _tune()
        out: dict[str, Any] = {}
        for i, (name, dim) in enumerate(self.dims.items()):
            out[name] = (tune.sample_from(SeededConditional(dim, np.random.default_rng(seed + i)))
                         if isinstance(dim, Conditional) else dim.to_tune(grid=grid))
        return out

    def grid_size(self, grid: bool = False) -> int:
        n = 1
        for dim in self.dims.values():
            if isinstance(dim, Dist) and (dim.kind == "grid" or (grid and dim.kind == "choice")):
                n *= len(dim.args)
        return n

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: categorical ``by`` fields first, then their branches."""
        values: dict[str, Any] = {}
        for name, dim in self.dims.items():
            if isinstance(dim, Conditional):
                case, branch = dim.branch(values[dim.by])
                values[name] = branch.suggest(trial, f"{name}{COND_SEP}{case}")
            else:
                values[name] = dim.suggest(trial, name)
        return values  # returned values win over captured names (quantised, branch-mapped)


def parse_space(cfg: RunConfig) -> SearchSpace:
    """Validate ``cfg.tune.space`` completely (before any trial) and return it parsed."""
    raw = cfg.tune.space
    if not raw:
        raise ConfigError("tune.space: empty; a sweep needs at least one searched field "
                          "(use `launch.py train` for a single run)")
    plain: dict[str, Dist] = {}
    conditional: dict[str, dict] = {}
    for name, value in raw.items():
        where = f"tune.space.{name}"
        if any(name.startswith(p) if p.endswith(".") else name == p for p in UNSEARCHABLE):
            raise ConfigError(f"{where}: this field cannot be searched (it decides where or "
                              f"how the sweep runs, not what a trial learns)")
        _check_field_path(cfg, name, where)
        if isinstance(value, dict):
            conditional[name] = value
        else:
            plain[name] = parse_dist(value, where)
    dims: dict[str, Dist | Conditional] = {}
    for name, dist in plain.items():
        _check_values(cfg, name, dist, f"tune.space.{name}")
        dims[name] = dist
    for name, value in conditional.items():
        dims[name] = _parse_conditional(cfg, name, value, plain)
    _check_search(cfg, dims)
    return SearchSpace(dims)


def _check_field_path(cfg: RunConfig, name: str, where: str) -> None:
    """An unknown path fails here with the loader's own 'unknown key ... did you mean' message."""
    try:
        current = getattr_dotted(cfg, name)
    except AttributeError:
        current = None  # not a field: replace() below names it
    except KeyError:
        return  # a new key inside a free-form mapping (augment.params): the values decide
    cfg.replace({name: current}, source=where)


def getattr_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(obj, dict):
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


def _check_values(cfg: RunConfig, name: str, dist: Dist, where: str) -> None:
    """Build a RunConfig with each value the distribution can produce (bounds, midpoints)."""
    for value in dist.spec.probes(dist.args):
        try:
            check_names(cfg.replace({name: value}, source=f"{where}={dist}"))
        except ConfigError as e:
            raise ConfigError(f"{where}: value {value!r} of {dist} is not allowed: "
                              f"{str(e).split(': ', 1)[-1]}") from None


def _parse_conditional(cfg: RunConfig, name: str, value: dict, plain: dict[str, Dist]
                       ) -> Conditional:
    where = f"tune.space.{name}"
    by = value.get("by")
    if not isinstance(by, str):
        raise ConfigError(f"{where}: a conditional needs `by: <field>` naming a categorical "
                          f"field of tune.space, e.g. by: optim.name")
    parent = plain.get(by)
    if parent is None or not parent.categorical:
        raise ConfigError(f"{where}: by={by!r} must name a choice[...] or grid[...] field of "
                          f"tune.space (conditionals cannot nest)")
    values = [getattr_dotted(cfg.replace({by: v}), by) for v in parent.args]
    cases: list[tuple[Any, Dist]] = []
    default = None
    for key, text in value.items():
        if key == "by":
            continue
        case_where = f"{where}.{key}"
        dist = parse_dist(text, case_where)
        if dist.kind == "grid":
            raise ConfigError(f"{case_where}: grid[...] inside a conditional is not supported; "
                              f"use choice[...]")
        if key == "default":
            _check_values(cfg, name, dist, case_where)
            default = dist
            continue
        match = [v for v in values if str(v) == str(key)]
        if not match:
            raise ConfigError(f"{case_where}: {key!r} is not a value of {by} (values: "
                              f"{', '.join(map(str, values))})")
        _check_values(cfg.replace({by: match[0]}), name, dist, case_where)
        cases.append((match[0], dist))
    missing = [v for v in values if v not in [c for c, _ in cases]]
    if missing and default is None:
        raise ConfigError(f"{where}: no branch for {by}={missing[0]!r}; add it or a `default:`")
    return Conditional(by, tuple(cases), default)


def _check_search(cfg: RunConfig, dims: dict[str, Dist | Conditional]) -> None:
    t = cfg.tune
    if t.search == "optuna":
        for name, dim in dims.items():
            for d in ([dim] if isinstance(dim, Dist) else [b for _, b in dim.cases]):
                if d.categorical and not all(isinstance(v, (str, int, float, bool, type(None)))
                                             for v in d.args):
                    raise ConfigError(f"tune.space.{name}: Optuna's categories must be "
                                      f"numbers or strings, got {d}")


def check_sweep(cfg: RunConfig) -> None:
    """Sweep-level rules, checked before Ray starts."""
    t = cfg.tune
    if t.metric.startswith("test/"):
        raise ConfigError(f"tune.metric={t.metric!r}: a sweep selects on validation data; the "
                          f"test split is only used for the final evaluation of the best config")
    if t.metric.startswith("val/") and not (cfg.data.val_shots or cfg.data.folds):
        raise ConfigError(f"tune.metric={t.metric!r} needs validation data: set data.val_shots "
                          f"(held-out examples per class) or data.folds (k-fold)")
    SEARCHES.get(t.search)
    SCHEDULERS.get(t.scheduler)


def expected_iterations(cfg: RunConfig) -> int:
    """Reports one trial makes when it runs to the end (ASHA's max_t)."""
    if cfg.data.folds > 1:
        return cfg.data.folds
    t = cfg.train
    if t.eval_every:
        return math.ceil(t.max_steps / t.eval_every) + 2 if t.max_steps else 10_000
    return t.epochs + 1  # one report per epoch, then the final row


# --------------------------------------------------------------------------------------------
# Search algorithms and schedulers (registries)


def _random(cfg: RunConfig, space: SearchSpace, concurrent: int, seed: int) -> tuple[Any, dict]:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return (BasicVariantGenerator(max_concurrent=concurrent, random_state=seed),
            space.param_space(seed=seed))


def _grid(cfg: RunConfig, space: SearchSpace, concurrent: int, seed: int) -> tuple[Any, dict]:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return (BasicVariantGenerator(max_concurrent=concurrent, random_state=seed),
            space.param_space(grid=True, seed=seed))


def _optuna(cfg: RunConfig, space: SearchSpace, concurrent: int, seed: int) -> tuple[Any, dict]:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=space, metric=cfg.tune.metric, mode=cfg.tune.mode, seed=seed)
    return ConcurrencyLimiter(searcher, max_concurrent=concurrent), {}


# search name -> (config, space, max concurrent trials, seed) -> (search_alg, param_space)
SEARCHES: Registry[Callable[[RunConfig, SearchSpace, int, int], tuple[Any, dict]]] = Registry(
    "search algorithm", "tune.search")
SEARCHES.register("random", _random)
SEARCHES.register("grid", _grid)
SEARCHES.register("optuna", _optuna)


def _fifo(cfg: RunConfig) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _asha(cfg: RunConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    t = cfg.tune
    return ASHAScheduler(time_attr="training_iteration", max_t=expected_iterations(cfg),
                         grace_period=t.grace_period, reduction_factor=t.reduction_factor)


# Population-based training is not offered: its trials restart from each other's optimizer
# state, which fit does not expose.
SCHEDULERS: Registry[Callable[[RunConfig], Any]] = Registry("scheduler", "tune.scheduler")
SCHEDULERS.register("none", _fifo)
SCHEDULERS.register("asha", _asha)


# --------------------------------------------------------------------------------------------
# One trial


def trial_config(base: RunConfig, params: dict[str, Any], trial_id: str,
                 sweep_dir: str | Path) -> RunConfig:
    """The RunConfig a trial trains: sampled values, sweep paths, and never the test split."""
    from cluster.resources import TrialNeeds

    overrides = {k: v for k, v in params.items() if COND_SEP not in k}
    overrides.update({
        "train.test": False, "train.progress": False, "train.resume": False,
        "train.output_dir": str(Path(sweep_dir) / "runs"), "train.run_name": trial_id,
        "train.monitor": base.tune.metric, "train.mode": base.tune.mode,
        "scaling.storage_path": str(Path(sweep_dir) / "train"),
    })
    if base.train.num_threads is None and base.scaling.num_workers == 0:
        overrides["train.num_threads"] = max(1, int(TrialNeeds.from_config(base).driver_cpus))
    return base.replace(overrides, source=f"trial {trial_id}")


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str) -> None:
    """The Tune trainable: one trial = one config, trained in-process or on Ray Train."""
    from ray import tune

    runner = _prepare_runner()
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = trial_config(from_dict(base, source="sweep config"), config, trial_id, sweep_dir)
    if cfg.train.test:  # unreachable by construction; guards the rule, even under python -O
        raise RuntimeError("a sweep trial must never load the test split")
    record = Path(sweep_dir) / "runs" / trial_id / TRIAL_RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    info = {"trial_id": trial_id, "params": {k: v for k, v in config.items()
                                             if COND_SEP not in k},
            "started": time.time(), "pid": os.getpid(), "node_id": _node_id(), **runner}
    t0 = time.perf_counter()
    import trainers.loop  # noqa: F401 - torch & co: paid once per runner, timed for benchmarks

    info["imports_s"] = round(time.perf_counter() - t0, 4)
    io.write_json(record, info)
    try:
        if cfg.data.folds > 1:
            _run_folds(cfg, trial_id)
        else:
            _run_once(cfg, trial_id)
    finally:  # also when Tune stops the trial (it unwinds this thread) or training fails
        info["ended"] = time.time()
        _release_memory()
        info["release_s"] = round(time.time() - info["ended"], 4)
        io.write_json(record, info)


# Tune reuses a runner only once the previous trial's thread has unwound (stopped trials unwind
# from inside tune.report); past this wait (Tune's default: 2 s) Ray 2.60 errors the next trial
# and never tells the searcher, whose concurrency slot then stays taken: the sweep hangs.
UNWIND_WAIT_S = "600"
_RUNNER = {"trials": 0, "frozen": False}


def _prepare_runner() -> dict[str, Any]:
    """Set this trial process up as a warm runner; return what trial.json records of it."""
    import psutil

    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = UNWIND_WAIT_S  # read by Tune at each reset
    if not _RUNNER["frozen"]:
        # what is alive now (Ray, torch, transformers) lives as long as the process: keep it out
        # of the collections that free each trial's model (a full one took ~1 s here)
        gc.freeze()
        _RUNNER["frozen"] = True
    _RUNNER["trials"] += 1
    return {"runner_trial": _RUNNER["trials"],
            "process_started": psutil.Process().create_time()}


def _run_once(cfg: RunConfig, trial_id: str) -> None:
    from ray import tune

    if cfg.scaling.num_workers > 0:
        result = _trainer(cfg, trial_id, report_to_tune=True).fit()
        if result.error is not None:
            raise result.error
        return
    from trainers.loop import Hooks, fit

    last: dict[str, Any] = {}

    def on_evaluation(row: dict[str, Any], _folder: Path | None) -> None:
        last.update(row)
        tune.report(numeric(row))

    def on_finish(metrics: dict[str, Any], _folder: Path | None) -> None:
        # the same final row a Ray Train worker sends: the best value of the monitored metric
        tune.report({**numeric(last), **final_row(metrics, cfg.train.monitor)})

    fit(cfg, Hooks(on_evaluation=on_evaluation, on_finish=on_finish))


def _run_folds(cfg: RunConfig, trial_id: str) -> None:
    """k folds one after another; after each, report the running mean/std over folds done."""
    from ray import tune

    metric = cfg.tune.metric
    scores: list[float] = []
    for fold in range(cfg.data.folds):
        fold_cfg = cfg.replace({"data.fold": fold, "train.run_name": f"{trial_id}/fold-{fold}"})
        last = _train_fold(fold_cfg, trial_id, fold)
        if metric not in last:
            raise ConfigError(f"tune.metric={metric!r}: not among the metrics a run reports "
                              f"({', '.join(sorted(last))})")
        scores.append(float(last[metric]))
        row = {k: v for k, v in numeric(last).items() if not k.startswith("val/")}
        mean, std = mean_std(scores)
        row.update({metric: mean, f"{metric}_std": std, f"{metric}_fold": scores[-1],
                    "fold": fold + 1})
        tune.report(row)


def _train_fold(cfg: RunConfig, trial_id: str, fold: int) -> dict[str, Any]:
    """Train one fold and return its last evaluation (not the best: no selection on it)."""
    if cfg.scaling.num_workers > 0:
        result = _trainer(cfg, f"{trial_id}-fold-{fold}", report_to_tune=False).fit()
        if result.error is not None:
            raise result.error
        rows = io.read_jsonl(cfg.run_dir / "metrics.jsonl")
        return rows[-1] if rows else {}
    from trainers.loop import fit

    result = fit(cfg)
    return result.history[-1] if result.history else {}


def _trainer(cfg: RunConfig, run_name: str, report_to_tune: bool) -> Any:
    """cluster.train's TorchTrainer, forwarding the workers' reports to this Tune trial."""
    from cluster.train import build_trainer, resolve_paths

    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return build_trainer(resolve_paths(cfg), run_name, callbacks=callbacks)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _release_memory() -> None:
    """Free what a finished or stopped trial held before the next one lands here."""
    gc.collect()
    gc.freeze()  # what outlives a trial (the runner's caches) is not scanned again next time
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def trial_dirname(trial: Any) -> str:
    """Tune's folder per trial: the trial id (short, no timestamps, stable across resumes)."""
    return trial.trial_id


# --------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepOutcome:
    sweep_dir: Path
    trials: int
    errors: int
    plan_table: str
    max_concurrent: int


def trial_log(metric: str) -> Any:
    """A Tune callback printing one line per finished or failed trial (Tune's own tables are
    silenced: they repeat every trial's full result)."""
    from ray.tune import Callback

    class TrialLog(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            r = trial.last_result or {}
            params = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items()
                               if COND_SEP not in k)
            value = r.get(metric)
            print(f"trial {trial.trial_id} ended ({params}): "
                  f"{r.get('training_iteration', 0)} report(s), {metric}="
                  f"{_short(value)}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"trial {trial.trial_id} failed (details in the report)", flush=True)

    return TrialLog()


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sweep_dir_of(cfg: RunConfig) -> Path:
    """<train.output_dir>/sweeps/<tune.name or recipe name>, absolute."""
    return Path(os.path.abspath(cfg.train.output_dir)) / "sweeps" / (cfg.tune.name or cfg.name)


def _sweep_config(cfg: RunConfig) -> RunConfig:
    """The config the sweep stores and trials start from: absolute paths (Tune runs each
    trial in its own working folder, where ../shared/... would point elsewhere)."""
    return cfg.with_absolute_paths()


def prepare_sweep_dir(cfg: RunConfig, *, resume: bool, overwrite: bool) -> Path:
    """Create (or check, for --resume) the sweep folder; never silently reuse another sweep."""
    sweep_dir = sweep_dir_of(cfg)
    stored = sweep_dir / SWEEP_RECORD
    if resume:
        if not stored.is_file():
            raise ConfigError(f"--resume: no sweep to resume at {sweep_dir} (start it without "
                              f"--resume)")
        before = io.load_yaml(stored)
        now = _sweep_config(cfg).to_dict()
        # how trials are run may change between runs of a sweep, not what they learn
        diff = [d for d in _differences(before, now) if d != "tune.reuse_runners"]
        if diff:
            raise ConfigError(f"--resume: the recipe differs from the sweep at {sweep_dir} in "
                              f"{', '.join(diff[:4])}; resume with the same recipe and overrides, "
                              f"or choose another tune.name=...")
        return sweep_dir
    if sweep_dir.exists():
        if not overwrite:
            raise ConfigError(f"sweep folder {sweep_dir} already exists: pass --resume to "
                              f"continue it, --overwrite to start it over, or choose another "
                              f"tune.name=...")
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True)
    _sweep_config(cfg).save(stored)
    return sweep_dir


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def plan_for(cfg: RunConfig) -> Any:
    """The resource plan for ``cfg`` on the connected Ray cluster.

    An autoscaling cluster (KubeRay with minReplicas 0) may have no worker node yet: when no
    trial fits now and tune.max_concurrent is set, the sweep trusts that cap and lets the
    autoscaler add nodes (Train's worker start-up timeout bounds the wait); without a cap the
    refusal stands.
    """
    from cluster.resources import (ResourcePlan, TrialNeeds, cluster_nodes,
                                   plan_trial_resources)
    from trainers.errors import ClusterError

    needs = TrialNeeds.from_config(cfg)
    nodes = cluster_nodes()
    try:
        return plan_trial_resources(nodes, needs, cap=cfg.tune.max_concurrent)
    except ClusterError as e:
        if not cfg.tune.max_concurrent:
            raise
        print(f"warning: {e}; running up to tune.max_concurrent={cfg.tune.max_concurrent} "
              f"trial(s) in case an autoscaler adds nodes", flush=True)
        return ResourcePlan(nodes, needs, cfg.tune.max_concurrent,
                            "tune.max_concurrent (nodes still to come)")


def reuses_runners(cfg: RunConfig) -> bool:
    """Whether trials share warm processes: only in-process ones. A Ray Train trial waits in
    TorchTrainer.fit, where Tune's stop (raised inside tune.report) never reaches: its workers
    would train on after ASHA stopped it, and the runner could not be handed on."""
    return cfg.tune.reuse_runners and cfg.scaling.num_workers == 0


def run_sweep(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
              retry_errored: bool = False, search_seed: int | None = None,
              callbacks: list | None = None) -> SweepOutcome:
    """Validate, plan, and run (or resume) the sweep of ``cfg``; return where it lives.

    ``search_seed`` seeds the search algorithm's sampling (default: train.seed); ``callbacks``
    are more Tune callbacks (e.g. a benchmark's timeline).
    """
    space = parse_space(cfg)
    check_sweep(cfg)
    sweep_dir = prepare_sweep_dir(cfg, resume=resume, overwrite=overwrite)
    base = _sweep_config(cfg)

    from ray import tune

    from cluster.session import ensure_ray

    ensure_ray(cfg.scaling.address)
    plan = plan_for(base)
    table = plan.table()
    print(table, flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), sweep_dir=str(sweep_dir)),
        plan.trial_resources)
    if resume:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=retry_errored)
    else:
        seed = cfg.train.seed if search_seed is None else search_seed
        search_alg, param_space = SEARCHES.get(cfg.tune.search)(base, space, plan.max_concurrent,
                                                            seed)
        t = cfg.tune
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=t.metric, mode=t.mode, search_alg=search_alg,
                scheduler=SCHEDULERS.get(t.scheduler)(base), num_samples=t.num_samples,
                time_budget_s=t.time_budget_s, trial_dirname_creator=trial_dirname,
                reuse_actors=reuses_runners(base)),
            run_config=tune.RunConfig(
                name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0,
                callbacks=[trial_log(t.metric), *(callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=t.max_failures)))
    grid = tuner.fit()
    errors = sum(1 for r in grid if r.error is not None)
    return SweepOutcome(sweep_dir, len(grid), errors, table, plan.max_concurrent)

"""The search-space language of ``tune.space``: distributions written as strings, validated
whole before Ray starts.

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
(plus every registry name, via trainers.checks), so a bad space fails at once, naming the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from trainers.checks import check_names
from trainers.config import RunConfig
from trainers.errors import ConfigError
from trainers.registry import Registry

COND_SEP = "@"  # optim.lr@sgd: the sgd branch of a conditional optim.lr (Optuna parameter)
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
DISTRIBUTIONS.register("choice", DistSpec(
    (1, 10_000), True, _categories, list, lambda a: _tune().choice(list(a)),
    _optuna_categorical))
DISTRIBUTIONS.register("grid", DistSpec(
    (1, 10_000), True, _categories, list, lambda a: _tune().grid_search(list(a)),
    _optuna_categorical))
DISTRIBUTIONS.register("uniform", DistSpec(
    (2, 2), False, _range, lambda a: [a[0], a[1], _inside(a[0], a[1])],
    lambda a: _tune().uniform(*a), lambda t, n, a: t.suggest_float(n, a[0], a[1])))
DISTRIBUTIONS.register("quniform", DistSpec(
    (3, 3), False, lambda a: _range(a, q=True),
    lambda a: [a[0], a[1], _qround(_inside(a[0], a[1]), a[2])],
    lambda a: _tune().quniform(*a), lambda t, n, a: t.suggest_float(n, a[0], a[1], step=a[2])))
DISTRIBUTIONS.register("loguniform", DistSpec(
    (2, 2), False, lambda a: _range(a, log=True),
    lambda a: [a[0], a[1], _inside(a[0], a[1], log=True)],
    lambda a: _tune().loguniform(*a), lambda t, n, a: t.suggest_float(n, a[0], a[1], log=True)))
DISTRIBUTIONS.register("qloguniform", DistSpec(
    (3, 3), False, lambda a: _range(a, log=True, q=True),
    lambda a: [a[0], a[1], _qround(_inside(a[0], a[1], log=True), a[2])],
    lambda a: _tune().qloguniform(*a),
    lambda t, n, a: _qround(t.suggest_float(n, a[0], a[1], log=True), a[2])))
# inclusive upper bound, like Python's random.randint (Tune's own excludes it)
DISTRIBUTIONS.register("randint", DistSpec(
    (2, 2), False, lambda a: _range(a, ints=True), lambda a: [a[0], a[1], (a[0] + a[1]) // 2],
    lambda a: _tune().randint(a[0], a[1] + 1), lambda t, n, a: t.suggest_int(n, a[0], a[1])))
DISTRIBUTIONS.register("lograndint", DistSpec(
    (2, 2), False, lambda a: _range(a, log=True, ints=True),
    lambda a: [a[0], a[1], round(math.sqrt(a[0] * a[1]))],
    lambda a: _tune().lograndint(a[0], a[1] + 1),
    lambda t, n, a: t.suggest_int(n, a[0], a[1], log=True)))

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

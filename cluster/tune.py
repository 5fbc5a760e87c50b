"""Ray Tune sweeps: the searchers and schedulers (registries), and the sweep's lifecycle:
validate, plan resources, run or resume, and record where it lives.

The search-space language is cluster/space.py; one trial is cluster/trial.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.shared_epochs import shared_counts, trial_base, trial_space
from cluster.space import COND_SEP, SearchSpace, parse_space
from cluster.trial import PREPARED, expected_iterations, run_trial, trial_dirname
from trainers import io
from trainers.config import RunConfig
from trainers.errors import ConfigError
from trainers.registry import Registry

SWEEP_RECORD = "sweep.yaml"


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


def check_sweep(cfg: RunConfig) -> None:
    """Sweep-level rules, checked before Ray starts."""
    t = cfg.tune
    if t.refit == "soup" and cfg.data.folds < 2:
        raise ConfigError("tune.refit=soup: the final model is the mean of the best trial's "
                          "k-fold preparations; set data.folds=k (k >= 2)")
    if t.metric.startswith("test/"):
        raise ConfigError(f"tune.metric={t.metric!r}: a sweep selects on validation data; the "
                          f"test split is only used for the final evaluation of the best config")
    if t.metric.startswith("val/") and not (cfg.data.val_shots or cfg.data.folds):
        raise ConfigError(f"tune.metric={t.metric!r} needs validation data: set data.val_shots "
                          f"(held-out examples per class) or data.folds (k-fold)")
    SEARCHES.get(t.search)
    SCHEDULERS.get(t.scheduler)


def check_sweep_data(cfg: RunConfig, space: SearchSpace) -> None:
    """Draw the sweep's few-shot sets once before Ray starts, when no data field is searched:
    data every trial would refuse (too few examples for data.shots, an empty class) is then one
    line here, not the same error from inside every trial. The test split is not read."""
    if not any(f.startswith("data.") for f in space.fields):
        from trainers.data import load_dataset

        load_dataset(cfg.data, with_test=False)


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
    name, field = (cfg.tune.name, "tune.name") if cfg.tune.name else (cfg.name, "name")
    return io.child_path(Path(os.path.abspath(cfg.train.output_dir)) / "sweeps", name, field)


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
        diff = [d for d in _differences(before, now)
                if d not in ("tune.reuse_runners", "tune.reuse_prepared", "tune.refit")]
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


def plan_for(cfg: RunConfig, trials: int = 1) -> Any:
    """The resource plan for ``cfg`` (a sweep of ``trials`` trials) on the connected Ray
    cluster, k-fold trials training folds side by side where there is room (plan_folds).

    An autoscaling cluster (KubeRay with minReplicas 0) may have no worker node yet: when no
    trial fits now and tune.max_concurrent is set, the sweep trusts that cap and lets the
    autoscaler add nodes (Train's worker start-up timeout bounds the wait); without a cap the
    refusal stands.
    """
    from cluster.resources import (
        ResourcePlan,
        TrialNeeds,
        cluster_nodes,
        plan_folds,
        plan_trial_resources,
    )
    from trainers.errors import ClusterError

    needs = TrialNeeds.from_config(cfg)
    nodes = cluster_nodes()
    try:
        sequential = plan_trial_resources(nodes, needs, cap=cfg.tune.max_concurrent)
        return plan_folds(nodes, cfg, trials, sequential)
    except ClusterError as e:
        if not cfg.tune.max_concurrent:
            raise
        print(f"warning: {e}; running up to tune.max_concurrent={cfg.tune.max_concurrent} "
              f"trial(s) in case an autoscaler adds nodes", flush=True)
        return ResourcePlan(nodes, needs, cfg.tune.max_concurrent,
                            "tune.max_concurrent (nodes still to come)")


def sweep_trials(cfg: RunConfig, space: SearchSpace) -> int:
    """Trials the sweep starts: num_samples per grid point (every choice is one for grid)."""
    return cfg.tune.num_samples * space.grid_size(grid=cfg.tune.search == "grid")


def tracking_callbacks(cfg: RunConfig) -> list[Any]:
    """Ray Tune's own logger callbacks for ``track.backends``: one MLflow run per trial, in
    the experiment named by track.experiment (default: the sweep's name). CSV is always on."""
    from ray.tune.logger import CSVLoggerCallback, TBXLoggerCallback

    from trainers.tracking import ensure_experiment, mlflow_uri

    callbacks: list[Any] = [CSVLoggerCallback()]
    if "tensorboard" in cfg.track.backends:
        callbacks.append(TBXLoggerCallback())
    if "mlflow" in cfg.track.backends:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        name = cfg.track.experiment or sweep_dir_of(cfg).name
        ensure_experiment(cfg, name)
        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(cfg), experiment_name=name,
                                              tags={"smallshot.recipe": cfg.name}))
    return callbacks


def reuses_runners(cfg: RunConfig) -> bool:
    """Whether trials share warm processes (cluster.trial): only in-process ones. A Ray Train
    trial waits in TorchTrainer.fit, where Tune's stop (raised inside tune.report) never
    reaches: its workers would train on after ASHA stopped it, and the runner could not be
    handed on (seen: reports 3-5 of a stopped trial arrived after it 'ended', then the hang)."""
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
    if not resume:
        check_sweep_data(cfg, space)
    sweep_dir = prepare_sweep_dir(cfg, resume=resume, overwrite=overwrite)
    base = _sweep_config(cfg)
    counts, why = shared_counts(cfg, space)
    if why:
        print(why, flush=True)
    if counts:  # one trial per point of the rest of the grid, scored at each epoch count
        space, base = trial_space(space), trial_base(base, counts)

    from ray import tune

    from cluster.session import ensure_ray

    ensure_ray(cfg.scaling.address)
    plan = plan_for(base, trials=sweep_trials(cfg, space))
    table = plan.table()
    print(table, flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), sweep_dir=str(sweep_dir),
                             folds_at_once=plan.folds_at_once,
                             epoch_counts=list(counts) if counts else None),
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
                callbacks=[trial_log(t.metric), *tracking_callbacks(base), *(callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=t.max_failures)))
    grid = tuner.fit()
    if cfg.tune.refit != "soup":  # the soup's final run averages the best trial's
        shutil.rmtree(sweep_dir / PREPARED, ignore_errors=True)
    errors = sum(1 for r in grid if r.error is not None)
    return SweepOutcome(sweep_dir, len(grid), errors, table, plan.max_concurrent)

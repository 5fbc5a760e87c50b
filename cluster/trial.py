"""One Tune trial: a driver function that trains one sampled config, in its own process or
through a TorchTrainer, and reports to Tune.

The trainable (``run_trial``) turns its sampled values into a RunConfig
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
import time
from pathlib import Path
from typing import Any

from cluster.space import COND_SEP
from trainers import io
from trainers.config import RunConfig, from_dict
from trainers.errors import ConfigError
from trainers.metrics import final_row, mean_std, numeric

TRIAL_RECORD = "trial.json"


def expected_iterations(cfg: RunConfig) -> int:
    """Reports one trial makes when it runs to the end (ASHA's max_t)."""
    if cfg.data.folds > 1:
        return cfg.data.folds
    t = cfg.train
    if t.eval_every:
        return math.ceil(t.max_steps / t.eval_every) + 2 if t.max_steps else 10_000
    return t.epochs + 1  # one report per epoch, then the final row


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

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = trial_config(from_dict(base, source="sweep config"), config, trial_id, sweep_dir)
    if cfg.train.test:  # unreachable by construction; guards the rule, even under python -O
        raise RuntimeError("a sweep trial must never load the test split")
    record = Path(sweep_dir) / "runs" / trial_id / TRIAL_RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    info = {"trial_id": trial_id, "params": {k: v for k, v in config.items()
                                             if COND_SEP not in k},
            "started": time.time(), "pid": os.getpid(), "node_id": _node_id()}
    io.write_json(record, info)
    try:
        if cfg.data.folds > 1:
            _run_folds(cfg, trial_id)
        else:
            _run_once(cfg, trial_id)
    finally:  # also when Tune stops the trial (it unwinds this thread) or training fails
        info["ended"] = time.time()
        io.write_json(record, info)
        _release_memory()


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
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def trial_dirname(trial: Any) -> str:
    """Tune's folder per trial: the trial id (short, no timestamps, stable across resumes)."""
    return trial.trial_id

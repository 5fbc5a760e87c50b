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
fold 1 was worse on that fold than its peers). Folds run one after another in the trial
process, so that one process (and one GPU) suffices per trial; where the cluster has room once
every trial has its slot, the planner gives a trial several fold bundles and its folds train
side by side as Ray tasks in them (``folds_at_once``), reported in fold order all the same.
"""

from __future__ import annotations

import collections
import gc
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.space import COND_SEP
from trainers import io
from trainers.config import RunConfig, from_dict
from trainers.errors import ConfigError
from trainers.metrics import final_row, mean_std, numeric

TRIAL_RECORD = "trial.json"
PREPARED = "prepared"  # the sweep's folder of prepared models (trainers/prepared.py)


def expected_iterations(cfg: RunConfig) -> int:
    """Reports one trial makes when it runs to the end (ASHA's max_t)."""
    if cfg.data.folds > 1:
        return cfg.data.folds
    t = cfg.train
    start = int(t.eval_at_start)
    if t.eval_every:  # the last report may come after a partial interval
        return math.ceil(t.max_steps / t.eval_every) + start if t.max_steps else 10_000
    return max(t.epochs + start, 1)  # one report per evaluation, the last with the final metrics


def sweep_prepared_cache(cfg: RunConfig, sweep_dir: str | Path) -> dict[str, Any]:
    """Where a sweep's runs share prepared models: <sweep>/prepared, unless the recipe names
    its own train.prepared_cache or turns tune.reuse_prepared off."""
    if cfg.tune.reuse_prepared and cfg.train.prepared_cache is None:
        return {"train.prepared_cache": str(Path(sweep_dir) / PREPARED)}
    return {}


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
        "track.backends": [],  # the sweep's Tune callbacks track trials (tune.tracking_callbacks)
    })
    overrides.update(sweep_prepared_cache(base, sweep_dir))
    if base.train.num_threads is None and base.scaling.num_workers == 0:
        overrides["train.num_threads"] = max(1, int(TrialNeeds.from_config(base).driver_cpus))
    return base.replace(overrides, source=f"trial {trial_id}")


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str,
              folds_at_once: int = 1, epoch_counts: list[int] | None = None) -> None:
    """The Tune trainable: one trial = one config, trained in-process or on Ray Train
    (``epoch_counts``: the train.epochs values it scores, cluster/shared_epochs.py)."""
    from ray import tune

    runner = prepare_runner()
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
    histories = None
    try:
        if cfg.data.folds > 1:
            info["folds_at_once"], info["folds"] = folds_at_once, []
            # side-by-side folds start their tasks now: those processes import torch and load
            # the model while this one does (an sst2 draw's second fold began 3.7 s after the
            # first when submitted after these imports, 0.8 s after it now)
            histories = _fold_histories(cfg, trial_id, folds_at_once)
        t0 = time.perf_counter()
        import trainers.loop  # noqa: F401 - torch & co: paid once per runner, timed for benchmarks

        info["imports_s"] = round(time.perf_counter() - t0, 4)
        io.write_json(record, info)
        if histories is not None:
            _report_folds(cfg, histories, info["folds"], epoch_counts)
        else:
            _run_once(cfg, trial_id)
    finally:  # also when Tune stops the trial (it unwinds this thread) or training fails
        if histories is not None:
            histories.close()  # cancels fold tasks still running (a stop raised in tune.report)
        info["ended"] = time.time()
        _release_memory()
        info["release_s"] = round(time.time() - info["ended"], 4)
        io.write_json(record, info)


# --------------------------------------------------------------------------------------------
# Warm runners: a trial process that Tune hands trial after trial (reuse_actors)

# Tune reuses a runner only once the previous trial's thread has unwound (stopped trials unwind
# from inside tune.report); past this wait (Tune's default: 2 s) Ray 2.60 errors the next trial
# without telling the searcher, whose concurrency slot then stays taken: the sweep hangs.
UNWIND_WAIT_S = "600"
_RUNNER = {"trials": 0}


def prepare_runner() -> dict[str, Any]:
    """Set this trial process up as a warm runner; return what trial.json records of it."""
    import psutil

    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = UNWIND_WAIT_S  # read by Tune at each reset
    if not _RUNNER["trials"]:
        # what is alive now (Ray, torch, ...) lives as long as the process: keep it out of the
        # collections that free each trial's model (a full one took ~1 s here)
        gc.freeze()
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

    def on_evaluation(row: dict[str, Any], _folder: Path | None) -> None:
        tune.report(numeric(row))

    def on_finish(metrics: dict[str, Any], _folder: Path | None) -> None:
        # the run's last evaluation, once, as the same final row a Ray Train worker sends
        tune.report(final_row(metrics, cfg.train.monitor))

    fit(cfg, Hooks(on_evaluation=on_evaluation, on_finish=on_finish))


def _fold_histories(cfg: RunConfig, trial_id: str, at_once: int = 1) -> Any:
    """What each of the k folds' runs gives (_fit_history), in fold order: one after another in
    this process, or ``at_once`` side by side (their tasks submitted here, before the first
    fold is asked for). Closing it cancels the folds still running."""
    folds = [cfg.replace({"data.fold": f, "train.run_name": f"{trial_id}/fold-{f}"})
             for f in range(cfg.data.folds)]
    if at_once > 1 and cfg.scaling.num_workers == 0:
        return _SideBySide(folds, at_once)
    return (_train_fold(c, trial_id, f) for f, c in enumerate(folds))


def _report_folds(cfg: RunConfig, histories: Any, where: list[dict[str, Any]] | None = None,
                  counts: list[int] | None = None) -> None:
    """After each fold (in fold order), report the running mean/std over folds done.
    ``where`` gets, per fold, the process that trained it and when. With ``counts`` (shared
    epochs), each count's running mean/std too, and ``metric`` is that of the best count."""
    from ray import tune

    from cluster.shared_epochs import metric_at, scores_at

    metric = cfg.tune.metric
    scores: list[float] = []
    at: dict[int, list[float]] = {e: [] for e in counts or []}
    for fold, (history, ran) in enumerate(histories):
        if where is not None:
            where.append({"fold": fold, **ran})
        last = history[-1] if history else {}
        if metric not in last:
            raise ConfigError(f"tune.metric={metric!r}: not among the metrics a run "
                              f"reports ({', '.join(sorted(last))})")
        scores.append(float(last[metric]))
        row = {k: v for k, v in numeric(last).items() if not k.startswith("val/")}
        mean, std = mean_std(scores)
        row.update({metric: mean, f"{metric}_std": std, f"{metric}_fold": scores[-1],
                    "fold": fold + 1})
        for e, value in scores_at(history, list(at), metric).items():
            at[e].append(value)
            row[metric_at(metric, e)], row[metric_at(metric, e) + "_std"] = mean_std(at[e])
        if at:  # Tune (and ASHA) see the trial at its best count
            sign = 1.0 if cfg.tune.mode == "max" else -1.0
            best = max(at, key=lambda e: (sign * row[metric_at(metric, e)], -e))
            row[metric], row[f"{metric}_std"] = (row[metric_at(metric, best)],
                                                 row[metric_at(metric, best) + "_std"])
        tune.report(row)


def _train_fold(cfg: RunConfig, trial_id: str,
                fold: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train one fold; its evaluation rows (the trial scores the last, not the best: no
    selection on them) and where/when."""
    if cfg.scaling.num_workers > 0:
        started = time.time()
        result = _trainer(cfg, f"{trial_id}-fold-{fold}", report_to_tune=False).fit()
        if result.error is not None:
            raise result.error
        return io.read_jsonl(cfg.run_dir / "metrics.jsonl"), {
            "trainer": True, "started": started, "ended": time.time()}
    return _fit_history(cfg.to_dict())


def _fit_history(cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """fit one fold's config (plain data: also the body of a fold task); its evaluation rows,
    and the process and times it trained in."""
    from trainers.loop import fit

    ran = {"pid": os.getpid(), "started": time.time()}
    result = fit(from_dict(cfg, source="fold config"))
    ran["ended"] = time.time()
    return result.history, ran


class _SideBySide:
    """What _fit_history gives for each fold, in fold order, ``at_once`` folds at a time: one in
    this process, the others as Ray tasks in the trial's placement group (Tune has a trial's
    tasks use it), each slot taking the next fold when it is free. The first tasks are
    submitted on creation; ``close`` cancels those still running (ASHA stopped the trial, a
    fold failed)."""

    def __init__(self, folds: list[RunConfig], at_once: int):
        import ray

        from cluster.resources import TrialNeeds

        alone = TrialNeeds.from_config(folds[0])
        self._task = ray.remote(_fit_history).options(num_cpus=alone.driver_cpus,
                                                      num_gpus=alone.driver_gpus, max_retries=0)
        self._folds, self._at_once = folds, at_once
        self._queued = collections.deque(range(len(folds)))
        self._running: dict[Any, int] = {}
        self._done: dict[int, Any] = {}
        self._mine: int | None = self._queued.popleft()  # this process's next fold
        self._fill()

    def _fill(self) -> None:
        while self._queued and len(self._running) < self._at_once - 1:
            f = self._queued.popleft()
            self._running[self._task.remote(self._folds[f].to_dict())] = f

    def _collect(self, wait: bool) -> None:
        import ray

        ready, _ = ray.wait(list(self._running), num_returns=1 if wait else len(self._running),
                            timeout=None if wait else 0)
        for ref in ready:
            f = self._running.pop(ref)
            try:
                self._done[f] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the fold's own error, not Ray's
                raise (e.cause if isinstance(e.cause, Exception) else e) from None
        self._fill()

    def __iter__(self) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any]]]:
        for fold in range(len(self._folds)):
            while fold not in self._done:
                if self._mine is None and self._queued:  # this process takes the next fold,
                    self._mine = self._queued.popleft()  # the tasks the ones after it
                    self._fill()
                if self._mine is not None:
                    mine, self._mine = self._mine, None
                    self._done[mine] = _fit_history(self._folds[mine].to_dict())
                    self._collect(wait=False)
                else:
                    self._collect(wait=True)
            yield self._done.pop(fold)

    def close(self) -> None:
        import ray

        for ref in self._running:
            ray.cancel(ref)
        self._running.clear()


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

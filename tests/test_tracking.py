"""Tracking: metrics.csv always, TensorBoard and MLflow on ask, for single runs and sweeps.

Everything is read back the way users read it: MLflow through its client API from a real file
store, TensorBoard through its event reader, the CSV with the csv module.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import CONFIGS

from trainers.loop import fit
from trainers.recipe import load_config

TINY = CONFIGS / "tiny-digits.yaml"


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def same_series(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Same steps, values equal up to float32 (TensorBoard stores float32)."""
    return [g[0] for g in got] == [w[0] for w in want] and [g[1] for g in got] == pytest.approx(
        [w[1] for w in want], rel=1e-6)


def test_single_run_logs_to_csv_tensorboard_and_mlflow(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "train.epochs=3",
                             "track.backends=[tensorboard, mlflow]", "optim.lr=0.004"])
    result = fit(cfg)
    rows = jsonl(result.run_dir / "metrics.jsonl")
    assert len(rows) == 3
    want = [(r["step"], r["val/accuracy"]) for r in rows]

    with (result.run_dir / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["val/accuracy"])) for r in table] == want

    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("val/accuracy")]
    assert same_series(tb, want), tb

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default: a local store beside the runs
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("tiny-digits")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == result.run_dir.name and run.info.status == "FINISHED"
    assert same_series(history(client, run.info.run_id, "val/accuracy"), want)
    assert same_series(history(client, run.info.run_id, "train/loss"),
                       [(r["step"], r["train/loss"]) for r in rows])
    final = client.get_metric_history(run.info.run_id, "final/test/accuracy")
    assert [m.value for m in final] == pytest.approx([result.metrics["test/accuracy"]])
    assert run.data.params["optim.lr"] == "0.004" and run.data.params["model.name"] == "mlp:64"


def test_any_tracking_uri_and_experiment_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in to file stores
    uri = (tmp_path / "elsewhere").as_uri()
    cfg = load_config(TINY, [f"train.output_dir={tmp_path / 'runs'}", "train.epochs=1",
                             "track.backends=[mlflow]", f"track.mlflow_uri={uri}",
                             "track.experiment=digits-a"])
    result = fit(cfg)
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits-a").experiment_id])
    assert history(client, run.info.run_id, "val/accuracy")[-1][1] == pytest.approx(
        result.history[-1]["val/accuracy"])
    assert (tmp_path / "elsewhere").is_dir() and not (tmp_path / "runs" / "mlflow.db").exists()
    assert not (result.run_dir / "tensorboard").exists()  # only what was asked for


def test_track_section_does_not_change_run_names(tmp_path: Path) -> None:
    plain = load_config(TINY, [f"train.output_dir={tmp_path}"])
    tracked = load_config(TINY, [f"train.output_dir={tmp_path}", "track.backends=[mlflow]"])
    assert plain.run_dir == tracked.run_dir


@pytest.mark.ray
def test_sweep_trials_are_tracked_by_ray_tune_callbacks(tmp_path: Path, local_ray) -> None:
    from cluster.tune import run_sweep

    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "train.epochs=2",
                             "tune.space={optim.lr: 'grid[0.001, 0.004]'}", "tune.search=grid",
                             "tune.scheduler=none", "tune.num_samples=1", "tune.max_concurrent=2",
                             "train.save_checkpoints=false", "track.backends=[mlflow, tensorboard]"])
    outcome = run_sweep(cfg)
    assert outcome.trials == 2 and outcome.errors == 0
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(outcome.sweep_dir.name)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    lrs = sorted(float(r.data.params["optim.lr"]) for r in runs)  # Tune logs the trial config
    assert lrs == [0.001, 0.004]
    for run in runs:
        trial_runs = list((outcome.sweep_dir / "runs").glob("*/metrics.jsonl"))
        by_lr = {}
        for path in trial_runs:
            trial_cfg = load_config(path.parent / "config.yaml", check_paths=False)
            by_lr[trial_cfg.optim.lr] = jsonl(path)
        rows = by_lr[float(run.data.params["optim.lr"])]
        logged = [v for _, v in history(client, run.info.run_id, "val/accuracy")]
        # Tune's final report repeats the best value; every evaluation is there, in order
        assert logged[:len(rows)] == pytest.approx([r["val/accuracy"] for r in rows])
    # csv always on: Tune's progress.csv per trial, and each trial run's own metrics.csv
    assert len(list(outcome.sweep_dir.glob("*/progress.csv"))) == 2
    assert len(list((outcome.sweep_dir / "runs").glob("*/metrics.csv"))) == 2
    assert list(outcome.sweep_dir.glob("*/events.out.tfevents.*"))

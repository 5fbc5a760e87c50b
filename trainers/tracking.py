"""Experiment tracking of one in-process run: metrics.csv always, TensorBoard and MLflow on ask.

``track.backends: [tensorboard, mlflow]`` in a recipe. TensorBoard event files go to
``<run folder>/tensorboard``; MLflow runs go to ``track.mlflow_uri`` (default: a local SQLite
store, ``<output_dir>/mlflow.db``: MLflow 3 refuses plain ``./mlruns`` folders unless
MLFLOW_ALLOW_FILE_STORE=true), one MLflow run per smallshot run, named after the run folder,
with the resolved config as parameters. Sweeps log through Ray Tune's own callbacks instead
(cluster/tune.py), so a trial's ``fit`` writes the CSV only.

    tensorboard --logdir runs
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from trainers.config import RunConfig

MLFLOW_RUN_FILE = "mlflow_run_id"


def mlflow_uri(cfg: RunConfig) -> str:
    """The tracking URI: the recipe's, else a SQLite file beside the run folders."""
    if cfg.track.mlflow_uri:
        return cfg.track.mlflow_uri
    return f"sqlite:///{Path(cfg.train.output_dir).resolve() / 'mlflow.db'}"


def ensure_experiment(cfg: RunConfig, name: str) -> str:
    """The id of MLflow experiment ``name``, created with its artifacts beside the runs (not
    in ./mlruns of whatever folder the process happens to run in)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(cfg))
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (Path(cfg.train.output_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def flat_params(cfg: RunConfig) -> dict[str, str]:
    """The resolved config as dotted MLflow parameters (values cut to MLflow's 6000 chars)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)[:6000]
    d = cfg.to_dict()
    d.pop("tune", None)
    walk("", d)
    return out


def numeric(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class CsvLog:
    """metrics.csv beside metrics.jsonl; the header grows when a row brings a new column."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume and path.is_file():
            with path.open(newline="") as f:
                self.rows = list(csv.DictReader(f))
        elif path.exists():
            path.unlink()

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)


class Tracker:
    """Sends each evaluation row (and the final metrics) to every configured backend."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.csv = CsvLog(run_dir / "metrics.csv", cfg.train.resume)
        self.tb = None
        self.mlflow = None
        backends = set(cfg.track.backends)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "mlflow" in backends:
            self.mlflow = _MlflowRun(cfg, run_dir)

    def log(self, row: dict[str, Any]) -> None:
        self.csv.log(row)
        step = int(row.get("step", 0))
        values = numeric(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log(values, step)

    def finish(self, final: dict[str, Any]) -> None:
        values = numeric(final)
        step = int(final.get("steps", 0))
        if self.tb is not None:
            for k, v in values.items():
                if k.startswith("test/"):
                    self.tb.add_scalar(k, v, step)
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.log({f"final/{k}": v for k, v in values.items()}, step)
            self.mlflow.end("FINISHED")


class _MlflowRun:
    """One MLflow run through the client API (no global active run to leak between runs)."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_uri(cfg))
        exp_id = ensure_experiment(cfg, cfg.track.experiment or cfg.name)
        id_file = run_dir / MLFLOW_RUN_FILE
        if cfg.train.resume and id_file.is_file():  # a resumed run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(exp_id, run_name=run_dir.name,
                                     tags={"smallshot.run_dir": str(run_dir.resolve()),
                                           "smallshot.recipe": cfg.name})
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

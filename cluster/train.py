"""Ray Train: the same ``trainers.fit`` on N workers (DDP or DeepSpeed), on any Ray cluster.

Only ``scaling.*`` changes between a laptop and a cluster. Each worker rebuilds the validated
config from plain data (no globals captured), runs ``fit`` with hooks that report metrics and
checkpoints to Ray, and resumes from ``ray.train.get_checkpoint()`` after a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers import io
from trainers.config import RunConfig, from_dict
from trainers.errors import ClusterError
from trainers.metrics import final_row, numeric

PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


@dataclass
class DistributedResult:
    metrics: dict[str, Any]
    checkpoint_path: str | None
    run_dir: Path
    storage_dir: str


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Absolute paths (output, storage, data/weights files) and a fixed run name: workers run
    in another folder, and a name derived from the config must not change on the way."""
    run_name = cfg.run_dir.name
    cfg = cfg.with_absolute_paths()
    storage = cfg.scaling.storage_path or os.path.join(cfg.train.output_dir, "ray")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return cfg.replace({"scaling.storage_path": storage, "train.run_name": run_name})


def backend(use_gpu: bool) -> str:
    """NCCL only where CUDA really is; gloo for CPUs and for clusters that merely claim GPUs."""
    import torch

    return "nccl" if use_gpu and torch.cuda.is_available() else "gloo"


def scaling_config(cfg: RunConfig):
    from ray.train import ScalingConfig

    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                         resources_per_worker=resources, placement_strategy=s.placement)


def check_fits(cfg: RunConfig, resources: dict[str, float]) -> None:
    """Refuse, before any worker starts, a request the cluster can never satisfy."""
    s = cfg.scaling
    need_cpu = s.num_workers * s.cpus_per_worker
    need_gpu = s.num_workers * s.gpus_per_worker if s.use_gpu else 0.0
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if need_gpu > have_gpu:
        raise ClusterError(f"scaling: {s.num_workers} workers x {s.gpus_per_worker:g} GPU need "
                           f"{need_gpu:g} GPUs, the cluster has {have_gpu:g}")
    if need_cpu > have_cpu:
        raise ClusterError(f"scaling: {s.num_workers} workers x {s.cpus_per_worker:g} CPU need "
                           f"{need_cpu:g} CPUs, the cluster has {have_cpu:g}")


def build_trainer(cfg: RunConfig, run_name: str | None = None, callbacks: list | None = None):
    """A TorchTrainer for ``cfg`` (resolved paths), usable alone or inside a Tune trial."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    # The controller takes one report per worker each poll (2 s by default, queue of one), so
    # runs that evaluate more often than that stall in report(); Ray passes this on to it.
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    has_val = bool(cfg.data.val_shots or cfg.data.folds)
    checkpoints = CheckpointConfig(
        num_to_keep=2,
        checkpoint_score_attribute=t.monitor if has_val else None,
        checkpoint_score_order=t.mode)
    return TorchTrainer(
        train_loop_per_worker=train_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend=backend(cfg.scaling.use_gpu)),
        run_config=RayRunConfig(
            name=run_name or cfg.run_dir.name, storage_path=cfg.scaling.storage_path,
            checkpoint_config=checkpoints,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            # Train's per-report INFO lines would bury ours; its log files keep every level
            logging_config=LoggingConfig(log_level=log_level()),
            callbacks=list(callbacks or [])),
    )


def train_distributed(cfg: RunConfig) -> DistributedResult:
    """Run ``cfg`` on Ray Train with ``scaling.num_workers`` workers and return its result."""
    from cluster.session import ensure_ray

    cfg = resolve_paths(cfg)
    storage_dir = os.path.join(cfg.scaling.storage_path, cfg.run_dir.name)
    if cfg.train.resume:
        done = finished_result(cfg, storage_dir)
        if done is not None:
            return done
    from trainers.locks import run_folder_lock

    # the driver holds the run folder's lock for its workers (they run with Hooks(lock=False))
    with run_folder_lock(cfg.run_dir):
        check_fits(cfg, ensure_ray(cfg.scaling.address))
        if not cfg.train.resume and "://" not in storage_dir:
            shutil.rmtree(storage_dir, ignore_errors=True)  # fresh run: no stale restore
        called = time.time()
        result = build_trainer(cfg).fit()
        io.write_json(cfg.run_dir / "workers" / "driver.json",
                      {"fit_called": called, "fit_returned": time.time()})
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    return DistributedResult(metrics, result.checkpoint.path if result.checkpoint else None,
                             cfg.run_dir, storage_dir)


def finished_result(cfg: RunConfig, storage_dir: str) -> DistributedResult | None:
    """The stored result of a run that already finished, else None (resume must not retrain)."""
    from ray.train import Result

    try:
        result = Result.from_path(storage_dir)
    except RuntimeError:  # no run (or no snapshot) stored under this name
        return None
    metrics = dict(result.metrics or {})
    if not metrics.get("finished"):
        return None
    return DistributedResult(metrics, result.checkpoint.path if result.checkpoint else None,
                             cfg.run_dir, storage_dir)


# --------------------------------------------------------------------------------------------
# On each worker


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: rebuild the config, then run the one training loop."""
    entered = time.time()
    import ray.train
    import torch

    from trainers.engines import world
    from trainers.loop import Hooks, fit

    cfg = from_dict(config["cfg"], source="worker config")
    quiet_report_log()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if cfg.train.num_threads is None:  # one worker per CPU slot: avoid oversubscription
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    # DeepSpeed: every rank writes a shard; one upload per node carries the node's folder
    # (ranks of a node share it, and parallel uploads of one folder only repeat the copy)
    uploads = rank == 0 or (cfg.train.engine == "deepspeed" and ctx.get_local_rank() == 0)

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        from ray.train import Checkpoint

        send = folder is not None and uploads
        ray.train.report(numeric(metrics),
                         checkpoint=Checkpoint.from_directory(str(folder)) if send else None)

    def finish(metrics: dict[str, Any], folder: Path | None) -> None:
        from ray.train import Checkpoint

        row = final_row(metrics, cfg.train.monitor)
        row["finished"] = 1  # not "done": Tune reads that key as "stop this trial"
        if rank != 0:
            ray.train.report(row, checkpoint=None)
            return
        # Train keeps only the metrics of reports that carry a checkpoint: without saved
        # weights (train.save_checkpoints=false) rank 0 sends a folder holding the row alone
        with tempfile.TemporaryDirectory(prefix="smallshot-final-") as tmp:
            if folder is None:
                folder = io.write_json(Path(tmp) / "final.json", row).parent
            ray.train.report(row, checkpoint=Checkpoint.from_directory(str(folder)))

    resume = local = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        local = Path(tempfile.mkdtemp(prefix="smallshot-resume-"))
        resume = Path(checkpoint.to_directory(str(local)))
        # a restarted worker group continues this run: keep its folder (best pointer, metrics)
        cfg = cfg.replace({"train.resume": True})
    info = record_placement(cfg, rank, ctx, resume, entered)
    assert world()[1] == ctx.get_world_size()
    try:
        fit(cfg, Hooks(on_evaluation=report, on_finish=finish, resume_from=resume,
                       local_rank=ctx.get_local_rank(), lock=False))
        info["fit_ended"] = time.time()
        io.write_json(cfg.run_dir / "workers" / f"rank-{rank}.json", info, indent=None)
    finally:
        if local is not None:  # the downloaded copy (weights + optimizer state) is spent
            shutil.rmtree(local, ignore_errors=True)


def log_level() -> str:
    return os.environ.get("SMALLSHOT_RAY_LOG_LEVEL", "WARNING").upper()


def quiet_report_log() -> None:
    """Ray 2.60 logs every report at INFO under a logger named by its file path, which the
    ``ray.train`` log level does not reach: give that logger the same level."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(log_level())


def record_placement(cfg: RunConfig, rank: int, ctx: Any, resume: Path | None,
                     entered: float) -> dict[str, Any]:
    """workers/rank-N.json: where each rank ran (node, host, pid, devices), when (its process
    started, the worker function was entered, fit began and ended: where start-up goes) and,
    for a restarted worker group, the epoch and step of the checkpoint it continued from."""
    import psutil
    import ray

    folder = cfg.run_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"rank": rank, "local_rank": ctx.get_local_rank(), "node_rank": ctx.get_node_rank(),
            "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "resumed_from": None, "process_started": psutil.Process().create_time(),
            "entered": entered}
    if resume is not None and (resume / "progress.json").is_file():
        progress = io.read_json(resume / "progress.json")
        info["resumed_from"] = {k: progress.get(k) for k in ("epoch", "global_step")}
    info["fit_started"] = time.time()
    io.write_json(folder / f"rank-{rank}.json", info, indent=None)
    return info

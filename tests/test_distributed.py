"""DDP on a real local Ray: it learns, replicas agree, it matches one worker, it survives a kill."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CONFIGS

from trainers.config import RunConfig
from trainers.recipe import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def digits(out: Path, *extra: str) -> RunConfig:
    return load_config(CONFIGS / "tiny-digits.yaml",
                       [f"train.output_dir={out}", "train.progress=false",
                        "scaling.cpus_per_worker=1", *extra])


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(local_ray, tmp_path_factory: pytest.TempPathFactory):
    """2 DDP workers x micro batch 16 (global batch 32), 5 epochs."""
    from cluster.train import train_distributed

    cfg = digits(tmp_path_factory.mktemp("ddp"), "scaling.num_workers=2", "train.batch_size=16",
                 "train.run_name=ddp")
    start = time.perf_counter()
    result = train_distributed(cfg)
    return cfg, result, time.perf_counter() - start


def test_ddp_learns_on_two_ranks_with_identical_weights(ddp_run) -> None:
    cfg, result, elapsed = ddp_run
    run = result.run_dir
    history = rows(run)
    assert len(history) == cfg.train.epochs
    assert history[-1]["train/loss"] < 0.5 * history[0]["train/loss"]
    assert result.metrics["epochs"] == cfg.train.epochs and result.metrics["finished"] == 1
    assert result.metrics["test/accuracy"] > 0.6  # chance is 0.1
    workers = [json.loads((run / "workers" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert workers[0]["pid"] != workers[1]["pid"]
    # every DDP checkpoint records each rank's weight digest: after the last step they agree
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    digests = json.loads((latest / "replicas.json").read_text())["sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert result.checkpoint_path and Path(result.checkpoint_path).is_dir()
    print(f"\nDDP 2 workers: {elapsed:.1f} s, test/accuracy {result.metrics['test/accuracy']:.4f}")


def test_ddp_matches_one_worker_with_the_same_global_batch(ddp_run, tmp_path: Path) -> None:
    from trainers.loop import fit

    cfg, result, _ = ddp_run
    one = fit(digits(tmp_path, "train.batch_size=32"))
    # the ranks' strided halves of a shuffle form the same 32-example batches one worker takes,
    # and DDP averages their gradients: the weights differ only by rounding, so validation
    # (full val set, evaluated on rank 0) follows the same path
    ddp_val = [r["val/accuracy"] for r in rows(result.run_dir)]
    one_val = [r["val/accuracy"] for r in one.history]
    assert ddp_val == pytest.approx(one_val, abs=0.02)
    ddp_acc, one_acc = result.metrics["test/accuracy"], one.metrics["test/accuracy"]
    assert abs(ddp_acc - one_acc) <= 0.05
    print(f"\ntest/accuracy: 2x16 DDP {ddp_acc:.4f} vs 1x32 {one_acc:.4f}")


def test_resume_of_a_finished_run_returns_its_result_without_training(ddp_run) -> None:
    from cluster.train import train_distributed

    cfg, result, _ = ddp_run
    run = result.run_dir
    before = (run / "metrics.jsonl").read_text(), (run / "workers" / "rank-0.json").read_text()
    again = train_distributed(cfg.replace({"train.resume": True}))
    assert again.metrics == result.metrics
    assert again.checkpoint_path == result.checkpoint_path
    # no worker ran: no new metrics rows, no new placement record
    assert ((run / "metrics.jsonl").read_text(), (run / "workers" / "rank-0.json").read_text()
            ) == before


def test_one_worker_without_saved_weights_returns_its_metrics_and_start_up_record(
        local_ray, tmp_path: Path) -> None:
    """Train keeps only the metrics of reports with a checkpoint: a run that saves no weights
    must still hand back its final metrics (the CLI printed nothing, then failed, before)."""
    from cluster.train import train_distributed

    cfg = digits(tmp_path, "scaling.num_workers=1", "train.save_checkpoints=false",
                 "train.epochs=2", "train.run_name=noweights")
    result = train_distributed(cfg)
    assert result.metrics["finished"] == 1 and result.metrics["epochs"] == 2
    assert 0.0 <= result.metrics["test/accuracy"] <= 1.0
    assert not list((result.run_dir / "checkpoints").glob("*/model*"))
    rank0 = json.loads((result.run_dir / "workers" / "rank-0.json").read_text())
    driver = json.loads((result.run_dir / "workers" / "driver.json").read_text())
    order = [driver["fit_called"], rank0["entered"], rank0["fit_started"], rank0["fit_ended"],
             driver["fit_returned"]]
    assert order == sorted(order) and rank0["process_started"] <= rank0["entered"]
    again = train_distributed(cfg.replace({"train.resume": True}))  # finished: not retrained
    assert again.metrics == result.metrics


def registered_checkpoints(storage: Path) -> int:
    """Checkpoints Ray has registered (a folder still uploading is not one to resume from)."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(snapshot.get("checkpoint_results", []))


def kill_rank_after_first_checkpoint(storage: Path, workers: Path, rank: int,
                                     killed: dict[str, Any], stop: threading.Event) -> None:
    """SIGKILL one worker process once Ray holds a checkpoint to resume from."""
    record = workers / f"rank-{rank}.json"
    while not stop.is_set():
        count = registered_checkpoints(storage)
        if record.is_file() and count:
            pid = json.loads(record.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, checkpoints=count)
            return
        time.sleep(0.02)


def train_while_killing(cfg, killer: Callable[..., None], *args: Any) -> tuple[Any, dict]:
    """Run ``train_distributed(cfg)`` while ``killer(*args, killed, stop)`` hunts a worker."""
    from cluster.train import train_distributed

    killed: dict[str, Any] = {}
    stop = threading.Event()
    thread = threading.Thread(target=killer, args=(*args, killed, stop), daemon=True)
    thread.start()
    try:
        result = train_distributed(cfg)
    finally:
        stop.set()
        thread.join()
    return result, killed


def test_killed_worker_resumes_from_the_last_checkpoint(local_ray, tmp_path: Path) -> None:
    epochs = 30  # long enough that the kill lands mid-run
    cfg = digits(tmp_path, "scaling.num_workers=2", "train.batch_size=16", f"train.epochs={epochs}",
                 "scaling.max_failures=2", "train.run_name=killed")
    storage = tmp_path / "ray" / "killed"
    result, killed = train_while_killing(
        cfg, kill_rank_after_first_checkpoint, storage, cfg.run_dir / "workers", 1)
    assert killed, "the run finished before a checkpoint appeared"
    after = json.loads((cfg.run_dir / "workers" / "rank-1.json").read_text())
    assert after["pid"] != killed["pid"]  # a new worker group took over
    assert killed["checkpoints"] >= 1 and after["resumed_from"] is not None
    resumed_at = after["resumed_from"]["epoch"]
    assert resumed_at >= 1  # continued from a checkpoint, not from scratch
    # the restarted group dropped the rows after its checkpoint and redid them: each epoch once
    history = rows(cfg.run_dir)
    assert [r["epoch"] for r in history] == [float(e) for e in range(1, epochs + 1)]
    assert result.metrics["epochs"] == epochs and result.metrics["steps"] == epochs * 7
    assert history[-1]["epoch"] == epochs
    assert result.metrics["test/accuracy"] > 0.7
    print(f"\nkilled rank 1 (pid {killed['pid']}) after {killed['checkpoints']} stored "
          f"checkpoint(s); resumed at epoch {resumed_at:g}; finished "
          f"{result.metrics['epochs']}/{epochs} epochs, test/accuracy "
          f"{result.metrics['test/accuracy']:.4f}")

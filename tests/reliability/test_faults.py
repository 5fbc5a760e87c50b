"""Fault injection on real Ray: a lost node, a failing trial, a killed sweep driver, a killed
worker. Each fault must be survived with no result lost.

Builds on tests/test_distributed.py (a worker SIGKILLed after the first checkpoint resumes) and
tests/test_tune.py (a killed sweep resumes without rerunning finished trials); here the faults
land where those tests do not reach: on a node of a multi-node cluster, inside a trial's own
training, mid-epoch, and with checkpoints whose bytes must survive the resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import CONFIGS, ROOT, simulated_cluster
from test_distributed import registered_checkpoints, rows, train_while_killing
from test_tune import SECOND_LONG_TRIAL, start_sweep_until_a_trial_finishes, trial_states

from trainers.config import RunConfig
from trainers.recipe import load_config

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.slow]

TINY = CONFIGS / "tiny-digits.yaml"
# A node lost without notice is declared dead after period x threshold (Ray's default ~30 s)
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_failure_threshold": 3}


def tiny(out: Path, *overrides: str) -> RunConfig:
    return load_config(TINY, [f"train.output_dir={out}", "train.progress=false", *overrides])


# --------------------------------------------------------------------------------------------
# The fault ledger: what was injected, what survived, what was lost


@dataclass
class Entry:
    case: str
    injected: int
    survived: int
    lost: int
    detail: str


@pytest.fixture(scope="module")
def ledger():
    entries: list[Entry] = []

    def record(case: str, injected: int, survived: int, lost: int, detail: str) -> None:
        entry = Entry(case, injected, survived, lost, detail)
        entries.append(entry)
        print(f"\n[fault] {case}: {injected} injected, {survived} survived, {lost} result(s) "
              f"lost; {detail}", flush=True)

    yield record
    if entries:
        print(f"\n[fault] total: {sum(e.injected for e in entries)} fault(s) injected in "
              f"{len(entries)} case(s), {sum(e.survived for e in entries)} survived, "
              f"{sum(e.lost for e in entries)} result(s) lost", flush=True)


# --------------------------------------------------------------------------------------------
# A simulated cluster: a head that runs no trials and two worker nodes


@dataclass
class ClusterHandle:
    cluster: Any
    workers: dict[str, Any]  # node id -> ray node handle, for the nodes that run trials


@pytest.fixture(scope="module")
def cluster():
    # the dashboard (on localhost) serves the State API that tells when a dead driver's
    # trial actors are gone
    head = {"num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS, "include_dashboard": True,
            "dashboard_host": "127.0.0.1"}
    with simulated_cluster(head, [{"num_cpus": 1}] * 2) as (c, nodes):
        yield ClusterHandle(c, {n.node_id: n for n in nodes})


def run_in_thread(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn`` with a deadline: a hung sweep fails the test instead of the whole session."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    runner.join(timeout_s)
    assert not runner.is_alive(), f"still running after {timeout_s:.0f} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def complete_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file being written: a line still cut short is left out."""
    try:
        lines = path.read_text().split("\n")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines[:-1] if line]


def metric_rows(path: Path) -> int:
    return len(complete_rows(path))



def failures_per_trial(sweep: Path) -> dict[str, int]:
    """Trial id -> failures Tune counted (retries included), from the sweep's stored state."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.num_failures for t in ExperimentAnalysis(str(sweep)).trials}


# --------------------------------------------------------------------------------------------
# The sweep driver killed (its own Ray, in subprocesses): finished trials' bytes survive


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trial_digest(sweep: Path, trial_id: str) -> dict[str, str]:
    """Tune's trial folder (params, results) and the trial's run folder (records, checkpoints)."""
    return {**{f"tune/{k}": v for k, v in tree_digest(sweep / trial_id).items()},
            **{f"run/{k}": v for k, v in tree_digest(sweep / "runs" / trial_id).items()}}


# warm runners finish a tiny trial in a tenth of a second: SECOND_LONG_TRIAL makes each trial
# last about a second, so the kill lands mid-sweep with some trials recorded as finished
DRIVER_KILL_LRS, DRIVER_KILL_EPOCHS = [1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2], 4


def sweep_cmd(out: Path, *extra: str) -> list[str]:
    lrs = ", ".join(str(lr) for lr in DRIVER_KILL_LRS)
    return [sys.executable, "launch.py", "tune", str(TINY), f"train.output_dir={out}",
            f"tune.space={{optim.lr: 'grid[{lrs}]'}}", "tune.num_samples=1",
            "tune.scheduler=none", "tune.max_concurrent=1", f"train.epochs={DRIVER_KILL_EPOCHS}",
            *SECOND_LONG_TRIAL, "tune.name=driver-killed", "--no-report", *extra]


def wait_for_no_trial_actors(timeout_s: float) -> None:
    """Ray ends a dead driver's actors; a rerun must not share a run folder with a straggler."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not list_actors(filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")]):
            return
        time.sleep(0.5)
    raise AssertionError(f"trial actors of the killed driver still alive after {timeout_s:.0f} s")


def test_sigkilled_sweep_driver_resumes_with_finished_trials_byte_identical(
        cluster: ClusterHandle, ledger, tmp_path: Path) -> None:
    # the driver dies, the cluster lives on (a Ray Job's entrypoint killed); tests/test_tune.py
    # kills a driver together with the Ray it started
    # snapshot often, so the kill lands mid-sweep with some trials recorded as finished
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "RAY_ADDRESS": cluster.cluster.address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    sweep = tmp_path / "sweeps" / "driver-killed"
    proc = start_sweep_until_a_trial_finishes(sweep_cmd(tmp_path), sweep, env,
                                              log=tmp_path / "first.log")
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone
    proc.wait()
    wait_for_no_trial_actors(60)
    before = trial_states(sweep)
    finished = sorted(t for t, s in before.items() if s == "TERMINATED")
    assert finished and len(finished) < len(DRIVER_KILL_LRS), before
    digests = {t: trial_digest(sweep, t) for t in finished}
    for files in digests.values():  # what is checked: results, params, records, checkpoints
        assert {"tune/result.json", "tune/params.json", "run/trial.json",
                "run/metrics.jsonl", "run/checkpoints/final/model.pt"} <= set(files), sorted(files)

    resumed = subprocess.run(sweep_cmd(tmp_path, "--resume"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    after = trial_states(sweep)
    assert len(after) == len(DRIVER_KILL_LRS) and set(after.values()) == {"TERMINATED"}, after
    now = {t: trial_digest(sweep, t) for t in finished}
    changed = {t: sorted(k for k in set(files) | set(now[t]) if files.get(k) != now[t].get(k))
               for t, files in digests.items()}
    lost = sum(1 for c in changed.values() if c)
    from ray.tune import ExperimentAnalysis

    # a trial restarted by the resume may get a fresh folder (Tune adds a suffix): ask Tune
    paths = {tr.trial_id: Path(tr.path) for tr in ExperimentAnalysis(str(sweep)).trials}
    for t in after:  # every trial holds its full results and its final weights
        results = (paths[t] / "result.json").read_text().splitlines()
        # one report per epoch (the last one carries the final metrics)
        assert json.loads(results[-1])["training_iteration"] == DRIVER_KILL_EPOCHS
        assert (sweep / "runs" / t / "checkpoints" / "final" / "model.pt").is_file()
    files = sum(len(d) for d in digests.values())
    ledger("sweep driver SIGKILLed", 1, int(resumed.returncode == 0), lost,
           f"{len(finished)} finished trial(s) kept, {files} file(s) byte-identical after "
           f"--resume: {lost == 0}; {len(DRIVER_KILL_LRS) - len(finished)} trial(s) run to the end")
    assert not lost, changed  # not rerun, nothing rewritten


# --------------------------------------------------------------------------------------------
# A trial whose training fails for real


def test_diverging_trial_is_an_error_in_the_report_and_the_others_are_unaffected(
        cluster: ClusterHandle, ledger, tmp_path: Path) -> None:
    from cluster.report import write_report
    from cluster.tune import run_sweep
    from trainers.loop import fit

    # sgd, no clipping, a coupled L2 term: lr x 2 x l2 > 2 makes the weights grow geometrically
    # until the loss overflows (inf at epoch 3 for lr=10); the small rates train normally
    cfg = tiny(tmp_path, "optim.name=sgd", "optim.grad_clip=null", "optim.l2=0.3",
               "tune.space={optim.lr: 'grid[0.05, 0.1, 10]'}", "tune.scheduler=none",
               "tune.num_samples=1", "tune.max_failures=1", "tune.name=diverging")
    outcome = run_in_thread(lambda: run_sweep(cfg), 180)
    assert (outcome.trials, outcome.errors) == (3, 1)
    rep = write_report(outcome.sweep_dir, final=False)
    by_lr = {float(r.params["optim.lr"]): r for r in rep.rows}
    bad = by_lr.pop(10.0)
    assert bad.status == "ERROR" and rep.rows[-1] is bad  # ranked last, whatever it scored
    assert rep.best_export is not None and rep.rows[0].status == "TERMINATED"
    assert "TrainingError" in bad.error and "loss became inf" in bad.error, bad.error
    assert "loss became inf" in (outcome.sweep_dir / "report.md").read_text()
    # a deterministic fault is retried tune.max_failures times, then left as an error
    assert failures_per_trial(outcome.sweep_dir)[bad.trial_id] == 2

    for lr, row in by_lr.items():
        assert row.status == "TERMINATED" and not row.error, (lr, row.error)
        assert row.iterations == cfg.train.epochs and row.score > 0.5, (lr, row.score)
        # unaffected: the same config trained alone gives the same validation curve
        run = outcome.sweep_dir / "runs" / row.trial_id
        alone = fit(load_config(run / "config.yaml", [f"train.output_dir={tmp_path / 'alone'}"]))
        in_sweep = rows(run)
        assert [h["val/accuracy"] for h in in_sweep] == [h["val/accuracy"] for h in alone.history]
        assert [h["train/loss"] for h in in_sweep] == pytest.approx(
            [h["train/loss"] for h in alone.history], rel=1e-5)
    ledger("trial raises (NaN/inf loss)", 1, 1, 0,
           f"ERROR with '{bad.error.split(': ', 1)[-1][:48]}...' after 2 attempts; "
           f"{len(by_lr)} other trial(s) TERMINATED, curves identical to standalone runs")


# --------------------------------------------------------------------------------------------
# A worker killed mid-epoch: same result as an undisturbed run


def kill_rank_mid_epoch(storage: Path, run_dir: Path, rank: int, last_step: int,
                        killed: dict[str, Any], stop: threading.Event) -> None:
    """SIGKILL a rank once Ray holds 2 checkpoints and the newest evaluation fell mid-epoch."""
    record = run_dir / "workers" / f"rank-{rank}.json"
    while not stop.is_set():
        done = complete_rows(run_dir / "metrics.jsonl")
        if done and record.is_file() and registered_checkpoints(storage) >= 2:
            row = done[-1]
            if row["step"] > last_step:
                return  # too late to land inside the epochs this test is about
            if abs(row["epoch"] - round(row["epoch"])) > 1e-3:
                pid = json.loads(record.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, step=row["step"], epoch=row["epoch"])
                return
        time.sleep(0.02)


def by_step(history: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The last row per step: a resumed run repeats the evaluations after its checkpoint."""
    return {r["step"]: r for r in history}


def test_worker_killed_mid_epoch_matches_an_undisturbed_run(cluster: ClusterHandle, ledger,
                                                            tmp_path: Path) -> None:
    from cluster.train import train_distributed

    # 2 ranks x 16 of 200 examples: 7 steps an epoch; evaluations (and checkpoints) every 5
    # steps fall inside epochs, so the kill lands mid-epoch and the resume starts mid-epoch
    common = ("scaling.num_workers=2", "scaling.cpus_per_worker=1", "train.batch_size=16",
              "train.epochs=6", "train.eval_every=5", "scaling.max_failures=1")
    steady = train_distributed(tiny(tmp_path, *common, "train.run_name=steady"))
    cfg = tiny(tmp_path, *common, "train.run_name=killed")
    result, killed = train_while_killing(cfg, kill_rank_mid_epoch, tmp_path / "ray" / "killed",
                                         cfg.run_dir, 0, 30)
    assert killed, "no mid-epoch moment with 2 stored checkpoints was caught"
    history = rows(cfg.run_dir)
    # the restarted group says where it resumed (the rows after its checkpoint were dropped and
    # redone, so the run's clock need not go back: no restart shows in the rows themselves)
    after = json.loads((cfg.run_dir / "workers" / "rank-0.json").read_text())
    assert after["pid"] != killed["pid"] and after["resumed_from"] is not None
    resumed_step = after["resumed_from"]["global_step"]
    assert 5 <= resumed_step <= 30 and resumed_step % 7, resumed_step  # a mid-epoch checkpoint
    assert [r["step"] for r in history] == sorted({r["step"] for r in history})  # each once
    assert result.metrics["steps"] == 42 and result.metrics["epochs"] == 6

    mine, ref = by_step(history), by_step(rows(steady.run_dir))
    assert sorted(mine) == sorted(ref)
    val_gap = max(abs(mine[s]["val/accuracy"] - ref[s]["val/accuracy"]) for s in ref)
    test_gap = abs(result.metrics["test/accuracy"] - steady.metrics["test/accuracy"])
    assert val_gap <= 0.02 and test_gap <= 0.02, (val_gap, test_gap)  # within noise
    ledger("worker SIGKILLed mid-epoch", 1, 1, 0,
           f"rank 0 killed at epoch {killed['epoch']:.2f}, resumed from step {resumed_step} "
           f"(mid-epoch); test/accuracy {result.metrics['test/accuracy']:.4f} vs undisturbed "
           f"{steady.metrics['test/accuracy']:.4f} (gap {test_gap:.4f}, val gap {val_gap:.4f})")


# --------------------------------------------------------------------------------------------
# A node lost mid-sweep (last: it leaves the cluster one node short)


def running_trial_on(runs: Path, node_ids: set[str]) -> tuple[str, str] | None:
    """(trial id, node id) of a trial that is training on one of ``node_ids`` right now."""
    for record_path in sorted(runs.glob("*/trial.json")):
        record = read_json(record_path)
        if (record and "ended" not in record and record["node_id"] in node_ids
                and metric_rows(record_path.parent / "metrics.jsonl") >= 1):
            return record["trial_id"], record["node_id"]
    return None


def test_node_lost_mid_sweep_its_trial_is_retried_and_every_trial_reported(
        cluster: ClusterHandle, ledger, tmp_path: Path) -> None:
    from cluster.report import write_report
    from cluster.tune import run_sweep, sweep_dir_of

    cfg = tiny(tmp_path, "tune.space={optim.lr: 'grid[1e-3, 2e-3, 3e-3, 5e-3]'}",
               "tune.scheduler=none", "tune.num_samples=1", "tune.max_failures=1",
               "train.epochs=40", "tune.name=node-lost")
    runs = sweep_dir_of(cfg) / "runs"
    survivors = set(cluster.workers)
    lost: dict[str, Any] = {}

    def remove_a_busy_node() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            hit = running_trial_on(runs, set(cluster.workers))
            if hit:
                trial_id, node_id = hit
                lost.update(trial=trial_id, node=node_id,
                            rows=metric_rows(runs / trial_id / "metrics.jsonl"))
                # no goodbye: the node's processes die at once, as in a crash
                cluster.cluster.remove_node(cluster.workers.pop(node_id), allow_graceful=False)
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_a_busy_node, daemon=True)
    remover.start()
    outcome = run_in_thread(lambda: run_sweep(cfg), 240)
    remover.join(5)
    assert lost, "no trial was seen training on a worker node"
    survivors.discard(lost["node"])

    rep = write_report(outcome.sweep_dir, final=False)
    assert outcome.trials == 4 and len(rep.rows) == 4
    assert all(isinstance(r.params["optim.lr"], float) for r in rep.rows)  # grid[1e-3, ...]
    assert {r.status for r in rep.rows} == {"TERMINATED"}, [(r.trial_id, r.status, r.error)
                                                            for r in rep.rows]
    complete = [r for r in rep.rows if r.iterations == cfg.train.epochs and r.score]
    table = (outcome.sweep_dir / "leaderboard.csv").read_text().splitlines()
    assert len(table) == 1 + 4 and all("TERMINATED" in line for line in table[1:])
    failures = failures_per_trial(outcome.sweep_dir)
    assert failures[lost["trial"]] == 1  # the trial on the lost node failed once, then ran
    retried = read_json(runs / lost["trial"] / "trial.json")
    assert retried["node_id"] in survivors and "ended" in retried
    row = next(r for r in rep.rows if r.trial_id == lost["trial"])
    assert row.error.startswith("retried after 1 failure(s)") and "node" in row.error, row.error
    ledger("node removed mid-sweep", 1, int(len(complete) == 4), 4 - len(complete),
           f"trial {lost['trial']} lost its node after {lost['rows']} epoch(s), retried on a "
           f"surviving node; {len(complete)}/4 trials TERMINATED with full results")

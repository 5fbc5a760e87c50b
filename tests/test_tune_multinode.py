"""A sweep on a simulated multi-node GPU cluster: 2 nodes x 2 (fake) GPUs, trials of 2 workers
x 1 GPU. The planner says 2 trials at once; Ray must run exactly that, where the plan said."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest

from conftest import CONFIGS, simulated_cluster
from trainers.recipe import load_config

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.slow]

SWEEP_TIMEOUT_S = 300  # a deadlocked sweep (drivers holding what workers need) fails here


@pytest.fixture(scope="module")
def gpu_cluster():
    """A head plus two nodes of 3 CPUs and 2 fake GPUs: 2 CPUs for a trial's two workers and
    1 for drivers, which Ray may place on GPU nodes too."""
    gpu_node = {"num_cpus": 3, "num_gpus": 2}
    with simulated_cluster({"num_cpus": 2, "num_gpus": 0}, [gpu_node] * 2) as (cluster, nodes):
        yield cluster, {n.node_id for n in nodes}, cluster.head_node.node_id


def overlap(spans: list[tuple[float, float]]) -> int:
    """Most spans open at one instant."""
    events = sorted(itertools.chain.from_iterable(((s, 1), (e, -1)) for s, e in spans),
                    key=lambda ev: (ev[0], ev[1]))
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def test_trials_of_two_gpu_workers_run_two_at_a_time_where_planned(tmp_path: Path,
                                                                   gpu_cluster) -> None:
    from cluster.tune import plan_for, run_sweep, sweep_dir_of

    _, gpu_node_ids, head_id = gpu_cluster
    cfg = load_config(CONFIGS / "tiny-digits.yaml", [
        f"train.output_dir={tmp_path}", "scaling.num_workers=2", "scaling.use_gpu=true",
        "scaling.gpus_per_worker=1", "scaling.cpus_per_worker=1", "train.epochs=2",
        "train.save_checkpoints=false", "tune.space={optim.lr: 'grid[1e-3, 3e-3, 1e-2]'}",
        "tune.scheduler=none", "tune.max_failures=0", "tune.num_samples=1"])

    plan = plan_for(cfg)
    assert plan.max_concurrent == 2 and plan.limited_by == "GPU"
    assert plan.workers_per_node() == [[2], [2]]
    planned_worker_nodes = {n.node_id for n in plan.nodes
                            for p in plan.placements if n.name in p.workers}
    planned_driver_nodes = {n.node_id for n in plan.nodes
                            for p in plan.placements if n.name == p.driver}
    assert planned_worker_nodes == gpu_node_ids and planned_driver_nodes == {head_id}
    assert "leave 1 CPU free on every node" in plan.table()

    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(outcome=run_sweep(cfg)), daemon=True)
    runner.start()
    runner.join(SWEEP_TIMEOUT_S)
    assert not runner.is_alive(), f"sweep still waiting after {SWEEP_TIMEOUT_S} s"
    outcome = box["outcome"]
    assert outcome.trials == 3 and outcome.errors == 0 and outcome.max_concurrent == 2
    assert "2 trial(s) at once (limited by GPU)" in outcome.plan_table

    runs = sweep_dir_of(cfg) / "runs"
    spans, worker_nodes, driver_nodes = [], [], set()
    for trial in sorted(p for p in runs.iterdir() if p.is_dir()):
        record = json.loads((trial / "trial.json").read_text())
        assert "ended" in record  # the driver returned: Train shut its workers down first
        spans.append((record["started"], record["ended"]))
        driver_nodes.add(record["node_id"])
        ranks = [json.loads(p.read_text()) for p in (trial / "workers").glob("rank-*.json")]
        assert sorted(r["rank"] for r in ranks) == [0, 1]
        assert all(len(r["gpu_ids"]) == 1 for r in ranks)
        nodes = {r["node_id"] for r in ranks}
        assert len(nodes) == 1, f"{trial.name}: ranks split over nodes {nodes}"  # as planned
        gpus = {(r["node_id"], r["gpu_ids"][0]) for r in ranks}
        assert len(gpus) == 2, f"{trial.name}: two ranks on one GPU"
        worker_nodes.append(nodes.pop())
    assert len(spans) == 3
    assert overlap(spans) == 2, f"trial spans {spans}"  # two at once, never three
    assert set(worker_nodes) <= gpu_node_ids and driver_nodes <= {head_id} | gpu_node_ids
    for (s1, e1), n1, (s2, e2), n2 in ((spans[i], worker_nodes[i], spans[j], worker_nodes[j])
                                       for i in range(3) for j in range(i + 1, 3)):
        if s1 < e2 and s2 < e1:  # trials that ran together used the two different nodes
            assert n1 != n2

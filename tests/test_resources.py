"""The GPU-aware trial planner: concurrency, placement per node, refusals (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.resources import (
    DRIVER_CPUS,
    Node,
    TrialNeeds,
    plan_folds,
    plan_trial_resources,
)
from trainers.errors import ClusterError
from trainers.recipe import load_config


def gpu_nodes(*gpus: int, cpus: float = 8) -> list[dict]:
    return [{"name": f"n{i}", "CPU": cpus, "GPU": g} for i, g in enumerate(gpus)]


def test_two_gpu_workers_per_trial_on_two_nodes_of_two_gpus() -> None:
    needs = TrialNeeds(num_workers=2, worker_cpus=1, worker_gpus=1)
    plan = plan_trial_resources(gpu_nodes(2, 2), needs)
    assert plan.max_concurrent == 2
    assert plan.limited_by == "GPU"
    assert plan.workers_per_node() == [[2], [2]]  # PACK keeps each trial on one node
    assert {p.workers[0] for p in plan.placements} == {"n0", "n1"}
    assert plan.trial_resources == {"CPU": DRIVER_CPUS}


def test_odd_gpu_counts_leave_the_odd_gpu_idle_or_use_it_across_nodes() -> None:
    two = TrialNeeds(num_workers=2, worker_cpus=1, worker_gpus=1)
    # 3 + 1 GPUs: one trial packs onto n0, the next spans n0's last GPU and n1's only one
    plan = plan_trial_resources(gpu_nodes(3, 1), two)
    assert plan.max_concurrent == 2
    assert sorted(plan.workers_per_node()) == [[1, 1], [2]]
    # under STRICT_PACK the split trial is impossible
    strict = TrialNeeds(num_workers=2, worker_cpus=1, worker_gpus=1, placement="STRICT_PACK")
    assert plan_trial_resources(gpu_nodes(3, 1), strict).max_concurrent == 1
    # a worker of 2 GPUs cannot take one GPU from each node
    big = TrialNeeds(num_workers=1, worker_cpus=1, worker_gpus=2)
    assert plan_trial_resources(gpu_nodes(3, 1), big).max_concurrent == 1
    assert plan_trial_resources(gpu_nodes(1, 1, 1), TrialNeeds(num_workers=3, worker_gpus=1)
                                ).max_concurrent == 1


def test_fractional_gpus_share_devices_only_for_single_worker_trials() -> None:
    quarter = TrialNeeds(num_workers=1, worker_cpus=1, worker_gpus=0.4)
    plan = plan_trial_resources(gpu_nodes(2, cpus=16), quarter)
    assert plan.max_concurrent == 4  # 2 per GPU (0.8 of each), not floor(2 / 0.4) = 5
    # in-process trials carry the fraction in their own bundle
    cfg = load_config(None, ["data.format=digits", "scaling.num_workers=0", "scaling.use_gpu=true",
                             "scaling.gpus_per_worker=0.5"])
    needs = TrialNeeds.from_config(cfg)
    assert needs.driver_bundle == {"CPU": 1.0, "GPU": 0.5}
    assert plan_trial_resources(gpu_nodes(1, cpus=4), needs).max_concurrent == 2
    with pytest.raises(ClusterError, match="fractional"):
        TrialNeeds(num_workers=2, worker_gpus=0.5)
    with pytest.raises(ClusterError, match="whole GPUs"):
        TrialNeeds(num_workers=1, worker_gpus=1.5)


def test_a_trial_larger_than_any_node_is_refused_clearly() -> None:
    needs = TrialNeeds(num_workers=1, worker_cpus=1, worker_gpus=4)
    with pytest.raises(ClusterError) as e:
        plan_trial_resources(gpu_nodes(2, 2), needs)
    msg = str(e.value)
    assert "GPUs must come from one node" in msg and "at most 8 CPU / 2 GPU on one node" in msg
    with pytest.raises(ClusterError, match="more GPUs than the whole cluster"):
        plan_trial_resources(gpu_nodes(1, 1), TrialNeeds(num_workers=3, worker_gpus=1))
    with pytest.raises(ClusterError, match="no alive nodes"):
        plan_trial_resources([], needs)


def test_cpu_only_cluster_reserves_the_driver_cpu_so_workers_always_fit() -> None:
    # 2 workers x 1 CPU + 0.5 driver = 2.5 CPUs: on 4 CPUs one trial, never two drivers whose
    # workers would then wait for each other forever
    needs = TrialNeeds(num_workers=2, worker_cpus=1)
    plan = plan_trial_resources([{"CPU": 4}], needs)
    assert plan.max_concurrent == 1 and plan.limited_by == "CPU"
    assert plan_trial_resources([{"CPU": 5}], needs).max_concurrent == 2
    # in-process trials: one bundle of cpus_per_worker
    local = TrialNeeds.from_config(load_config(None, ["data.format=digits", "scaling.num_workers=0"]))
    assert local.num_workers == 0 and local.driver_bundle == {"CPU": 1.0}
    assert plan_trial_resources([{"CPU": 2}], local).max_concurrent == 2
    with pytest.raises(ClusterError, match="more CPUs than the whole cluster"):
        plan_trial_resources([{"CPU": 2}], needs)


def test_max_concurrent_caps_the_plan_and_spread_strategies_use_distinct_nodes() -> None:
    needs = TrialNeeds(num_workers=1, worker_cpus=1, worker_gpus=1)
    plan = plan_trial_resources(gpu_nodes(4, 4), needs, cap=3)
    assert plan.max_concurrent == 3 and plan.limited_by == "tune.max_concurrent=3"
    spread = TrialNeeds(num_workers=3, worker_cpus=1, placement="STRICT_SPREAD")
    plan = plan_trial_resources([{"CPU": 4}, {"CPU": 4}, {"CPU": 4}], spread)
    assert all(len(set(p.workers)) == 3 for p in plan.placements)
    # 3 trials would need 3 workers per node, but 3 drivers (1.5 CPU) may all land on one node
    assert plan.max_concurrent == 2
    assert plan.limited_by.startswith("placement: each node keeps CPU free for drivers")
    with pytest.raises(ClusterError, match="STRICT_SPREAD"):
        plan_trial_resources([{"CPU": 8}, {"CPU": 8}], spread)


def test_workers_never_count_on_cpus_a_driver_may_take() -> None:
    """Ray puts a driver wherever CPU is free: on a 2-CPU GPU node it strands the GPUs."""
    needs = TrialNeeds(num_workers=2, worker_cpus=1, worker_gpus=1)
    tight = [Node("head", 2, 0), Node("a", 2, 2), Node("b", 2, 2)]
    assert plan_trial_resources(tight, needs).max_concurrent == 1
    roomy = [Node("head", 2, 0), Node("a", 3, 2), Node("b", 3, 2)]
    plan = plan_trial_resources(roomy, needs)
    assert plan.max_concurrent == 2 and "leave 1 CPU free on every node" in plan.table()


def test_plan_table_names_every_node_and_what_it_hosts() -> None:
    nodes = [Node("head", 2, 0), Node("gpu-a", 4, 2), Node("gpu-b", 4, 2)]
    plan = plan_trial_resources(nodes, TrialNeeds(num_workers=2, worker_cpus=1, worker_gpus=1))
    table = plan.table()
    assert "2 trial(s) at once (limited by GPU)" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| node ")}
    assert set(rows) == {"head", "gpu-a", "gpu-b"}
    assert "t1:driver t2:driver" in rows["head"]
    assert "t1:w0,1" in rows["gpu-a"] and "t2:w0,1" in rows["gpu-b"]


# --------------------------------------------------------------------------------------------
# k-fold trials: folds side by side only where every trial already has its slot


def folds_recipe(*overrides: str):
    return load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny-digits.yaml",
                       ["data.folds=4", "data.val_shots=0", *overrides])


def fold_plan(nodes: list, trials: int, *overrides: str):
    cfg = folds_recipe(*overrides)
    sequential = plan_trial_resources(nodes, TrialNeeds.from_config(cfg),
                                      cap=cfg.tune.max_concurrent)
    return plan_folds(nodes, cfg, trials, sequential)


def test_folds_run_side_by_side_only_with_room_left_by_the_trials() -> None:
    alone = fold_plan([{"CPU": 8}], trials=1)
    assert alone.folds_at_once == 4 and alone.max_concurrent >= 1
    assert alone.trial_resources.bundles == [{"CPU": 1.0}] * 4  # the trial trains fold 1
    assert fold_plan([{"CPU": 8}], trials=2).folds_at_once == 4
    # two trials on 6 CPUs: 3 folds each would fit, but 3 + 1 takes as long as 2 + 2
    assert fold_plan([{"CPU": 6}], trials=2).folds_at_once == 2
    crowded = fold_plan([{"CPU": 8}], trials=8)  # trials fill the cluster: folds in turn
    assert crowded.folds_at_once == 1 and crowded.trial_resources == {"CPU": 1.0}
    # one GPU: one fold at a time, whatever the CPUs
    gpu = ["scaling.use_gpu=true", "scaling.gpus_per_worker=1"]
    assert fold_plan([{"CPU": 16, "GPU": 1}], 1, *gpu).folds_at_once == 1
    two = fold_plan([{"CPU": 16, "GPU": 2}], 1, *gpu)
    assert two.folds_at_once == 2 and two.trial_resources.bundles == [{"CPU": 1.0, "GPU": 1}] * 2
    # half a GPU per fold: separate processes, not NCCL ranks, so shares are fine
    assert fold_plan([{"CPU": 16, "GPU": 1}], 1, "scaling.use_gpu=true",
                     "scaling.gpus_per_worker=0.5").folds_at_once == 2


def test_parallel_folds_setting_is_obeyed_or_refused_in_one_line() -> None:
    assert fold_plan([{"CPU": 8}], 1, "tune.parallel_folds=1").folds_at_once == 1
    assert fold_plan([{"CPU": 8}], 8, "tune.parallel_folds=2").folds_at_once == 2
    assert fold_plan([{"CPU": 8}], 1, "scaling.num_workers=2").folds_at_once == 1  # Ray Train
    assert fold_plan([{"CPU": 2}], 1).folds_at_once == 2  # two 1-CPU folds on 2 CPUs
    with pytest.raises(ClusterError, match="3 folds at once") as refused:
        fold_plan([{"CPU": 2}], 1, "tune.parallel_folds=3")
    message = str(refused.value)
    assert message.startswith("tune.parallel_folds=3: ") and "tune.parallel_folds=0" in message
    assert "\n" not in message

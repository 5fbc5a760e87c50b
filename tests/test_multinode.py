"""A simulated 3-node cluster with fake GPUs: SPREAD placement across nodes, fail-fast sizing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, simulated_cluster
from trainers.config import RunConfig
from trainers.recipe import load_config
from trainers.errors import ClusterError

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.slow]

NODES, CPUS, GPUS = 3, 2, 2  # per node; the GPUs are only advertised (gloo does the work)


@pytest.fixture(scope="module")
def fake_cluster():
    node = {"num_cpus": CPUS, "num_gpus": GPUS}
    with simulated_cluster({**node, "include_dashboard": False},
                           [node] * (NODES - 1)) as (cluster, _):
        yield cluster


def digits(out: Path, *extra: str) -> RunConfig:
    return load_config(CONFIGS / "tiny-digits.yaml", [
        f"train.output_dir={out}", "train.progress=false", "train.epochs=2",
        "train.batch_size=8", "scaling.use_gpu=true", "scaling.cpus_per_worker=0.5", *extra])


def test_spread_workers_land_on_several_nodes_and_train(fake_cluster, tmp_path: Path) -> None:
    from cluster.train import train_distributed

    cfg = digits(tmp_path, "scaling.num_workers=4", "scaling.placement=SPREAD")
    result = train_distributed(cfg)
    assert result.metrics["epochs"] == 2 and result.metrics["test/accuracy"] > 0.3
    ranks = [json.loads(p.read_text()) for p in sorted((result.run_dir / "workers").glob(
        "rank-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    nodes = {r["node_id"] for r in ranks}
    assert len(nodes) >= 2, nodes
    assert all(len(r["gpu_ids"]) == 1 for r in ranks)  # each worker got one (fake) GPU
    # two workers on one node must not share a GPU
    per_node = [(r["node_id"], r["gpu_ids"][0]) for r in ranks]
    assert len(set(per_node)) == len(per_node)
    print(f"\n4 SPREAD workers on {len(nodes)} of {NODES} nodes; "
          f"test/accuracy {result.metrics['test/accuracy']:.4f}")


def test_more_gpus_than_the_cluster_has_fail_fast_with_the_numbers(fake_cluster,
                                                                    tmp_path: Path) -> None:
    from cluster.train import train_distributed

    workers = NODES * GPUS + 2
    start = time.perf_counter()
    with pytest.raises(ClusterError, match=rf"{workers} workers x 1 GPU need {workers} GPUs, "
                                           rf"the cluster has {NODES * GPUS}"):
        train_distributed(digits(tmp_path, f"scaling.num_workers={workers}"))
    assert time.perf_counter() - start < 10  # refused before any worker starts
    assert not (tmp_path / "ray").exists()

"""Shared fixtures: paths to ../shared, tiny recipes, and one local Ray instance per module."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CONFIGS = ROOT / "configs"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a user's `launch.py up` instance is never what a test connects to
os.environ["SMALLSHOT_LOCAL_RAY_FILE"] = os.path.join(
    tempfile.mkdtemp(prefix="smallshot-tests-"), "local-ray.json")


def need_shared(*parts: str) -> Path:
    """The path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data/weights live in ../shared beside the repo)")
    return path


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides that keep a tiny-digits run fast and inside a temporary folder."""
    return [f"train.output_dir={tmp_path}", "train.progress=false"]


@contextlib.contextmanager
def simulated_cluster(head: dict[str, Any], nodes: list[dict[str, Any]]) -> Iterator[tuple[Any, list[Any]]]:
    """A multi-node Ray on this machine (``ray.cluster_utils.Cluster``), connected and torn down.

    ``head`` and each of ``nodes`` are node arguments (num_cpus, num_gpus: GPUs are only
    advertised, gloo does the work). Yields the cluster and the added nodes' handles.
    """
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from cluster.session import free_port

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    if head.get("include_dashboard"):  # Ray's fixed default (8265) fails where another Ray holds it
        head = {"dashboard_port": free_port("127.0.0.1"), **head}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        added = [cluster.add_node(**n) for n in nodes]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster, added
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray instance shared by one test module (2 CPUs, dashboard off)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    # dashboard on (bound to localhost): Ray Train's placement-group cleaner needs its State API
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()

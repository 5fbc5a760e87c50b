"""Shared fixtures: paths to ../shared, tiny recipes, and one local Ray instance per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CONFIGS = ROOT / "configs"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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

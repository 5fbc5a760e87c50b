"""`launch.py up` keeps a local Ray instance; later commands connect to it; `down` stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300, check=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_up_train_down(tmp_path: Path) -> None:
    record_file = tmp_path / "local-ray.json"
    env = {**os.environ, "SMALLSHOT_LOCAL_RAY_FILE": str(record_file),
           "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    try:
        up = launch(env, "up", "--num-cpus", "2")
        assert up.returncode == 0, up.stderr
        assert "started" in up.stdout
        record = json.loads(record_file.read_text())
        assert record["address"].startswith("127.0.0.1:") and alive(record["pid"])
        again = launch(env, "up")
        assert again.returncode == 0 and "already running" in again.stdout
        assert json.loads(record_file.read_text())["pid"] == record["pid"]

        run = launch(env, "train", str(CONFIGS / "tiny-digits.yaml"), "scaling.num_workers=1",
                     "scaling.cpus_per_worker=1", "train.epochs=1", "train.progress=false",
                     f"train.output_dir={tmp_path / 'runs'}", "train.run_name=kept")
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert f"using the local Ray instance kept up by `launch.py up` at {record['address']}" \
            in run.stdout
        assert "started a local Ray instance" not in run.stdout
        assert "test/accuracy" in run.stdout
        assert (tmp_path / "runs" / "kept" / "workers" / "rank-0.json").is_file()
        assert alive(record["pid"])  # the instance outlives the command

        down = launch(env, "down")
        assert down.returncode == 0 and f"stopped the local Ray instance at {record['address']}" \
            in down.stdout
        assert not alive(record["pid"]) and not record_file.exists()
        assert "no local Ray instance kept up" in launch(env, "down").stdout
    finally:
        launch(env, "down")

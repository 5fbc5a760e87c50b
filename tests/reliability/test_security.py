"""Security defaults: localhost dashboard, token auth, safe checkpoint loading, no shell injection."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from cluster.jobs import job_entrypoint
from trainers.errors import CheckpointError
from trainers.models import load_state_file

PROBE = """
import json, subprocess, time, ray
from cluster.session import ensure_ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
ensure_ray(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process too, with its own gRPC server
time.sleep(2)  # the agents open their ports after start-up
import psutil
me = psutil.Process()
pids = {me.pid, *(c.pid for c in me.children(recursive=True))}
listeners = []
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
    if any(f"pid={p}," in line for p in pids):
        listeners.append({"address": line.split()[3], "process": line.split('"')[1]})
print(json.dumps({"dashboard": ray._private.worker.get_dashboard_url(),
                  "token": is_token_auth_enabled(), "listeners": listeners}))
ray.shutdown()
"""
LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")


@pytest.mark.ray
def test_local_ray_binds_dashboard_to_localhost_with_token_auth(tmp_path):
    """A Ray that smallshot starts listens on loopback only (`ss -ltn`: GCS, raylet, agents,
    workers, dashboard), demands a token, and keeps the token file private."""
    import shutil

    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "SMALLSHOT_DASHBOARD"))}
    env["HOME"] = str(tmp_path)  # Ray keeps its generated token under ~/.ray
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["dashboard"].startswith("127.0.0.1:"), info
    assert info["token"] is True
    names = {item["process"] for item in info["listeners"]}
    assert {"gcs_server", "raylet"} <= names, info["listeners"]  # the probe saw Ray's servers
    exposed = [item for item in info["listeners"] if not item["address"].startswith(LOOPBACK)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    token_file = tmp_path / ".ray" / "auth_token"
    assert token_file.is_file()
    assert token_file.stat().st_mode & 0o777 == 0o600  # not readable by other users
    assert token_file.read_text().strip() not in out.stdout + out.stderr  # never printed


def test_job_entrypoint_passes_no_user_string_through_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    evil = [f"train.run_name=x; touch {marker}", f"optim.name=$(touch {marker})", "a=`id`"]
    entry = job_entrypoint("train", "configs/tiny-digits.yaml", evil)
    assert shlex.split(entry) == ["python", "launch.py", "train", "configs/tiny-digits.yaml",
                                  *evil]
    # run the exact string the way a shell would, with echo standing in for python
    subprocess.run(["bash", "-c", "echo " + entry.split(" ", 1)[1]], check=True,
                   capture_output=True)
    assert not marker.exists()


def test_checkpoints_load_weights_only(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"  # an arbitrary class: unpickling one could run code
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_state_file(path)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_state_file(good)["w"], torch.ones(2))

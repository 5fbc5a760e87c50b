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
import json, ray
from cluster.session import ensure_ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
ensure_ray()
print(json.dumps({"dashboard": ray._private.worker.get_dashboard_url(), "token": is_token_auth_enabled()}))
ray.shutdown()
"""


@pytest.mark.ray
def test_local_ray_binds_dashboard_to_localhost_with_token_auth(tmp_path):
    """A Ray that smallshot starts listens on 127.0.0.1 only and demands a token."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "SMALLSHOT_DASHBOARD"))}
    env["HOME"] = str(tmp_path)  # Ray keeps its generated token under ~/.ray
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["dashboard"].startswith("127.0.0.1:"), info
    assert info["token"] is True
    token_file = tmp_path / ".ray" / "auth_token"
    if token_file.is_file():  # the token itself never reaches our output
        assert token_file.read_text().strip() not in out.stdout + out.stderr


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

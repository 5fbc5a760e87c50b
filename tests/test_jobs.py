"""`launch.py submit|status|logs|stop|list` against a real local Ray head with token authentication.

The head is started with `ray start --block` in its own session, so teardown stops exactly the
processes it spawned and never another Ray instance on the machine (`ray stop` would).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/tiny-digits.yaml"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Head:
    url: str
    token: str
    home: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jobs_api_ready(url: str, token: str) -> bool:
    request = urllib.request.Request(f"{url}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (it shuts its node down), then reap stragglers."""
    import ray  # noqa: F401 - puts Ray's bundled psutil on the path
    import psutil

    try:
        family = [psutil.Process(proc.pid)]
        family += family[0].children(recursive=True)  # includes workers that left the group
    except psutil.NoSuchProcess:
        return
    family[0].terminate()
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    if not (BIN / "ray").exists():
        pytest.skip(f"no `ray` executable next to {sys.executable}")
    home = tmp_path_factory.mktemp("home")  # keeps the user's ~/.ray/auth_token out of it
    # Short and outside pytest's tmp: Ray's unix socket paths live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="ssray-"))
    token = secrets.token_hex(16)
    dash, gcs, client_port, agent = (_free_port() for _ in range(4))
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # job entrypoints run `python`
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path_factory.getbasetemp() / "ray-head.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client_port}",
         f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while not _jobs_api_ready(url, token):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = Path(log.name).read_text()[-2000:]
                pytest.fail(f"Ray head did not come up (exit code {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield Head(url=url, token=token, home=home)
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def client_env(head: Head, tmp_path: Path) -> dict[str, str]:
    """The submitting side: only the token and a private jobs file, no Ray auth mode of its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(head.home), RAY_AUTH_TOKEN=head.token,
               SMALLSHOT_JOBS_FILE=str(tmp_path / "jobs.jsonl"))
    return env


def launch(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _job_id(stdout: str) -> str:
    match = re.search(r"^submitted (\S+) to ", stdout, re.M)
    assert match, f"no job id in:\n{stdout}"
    return match.group(1)


def _ray_client(head: Head):
    """Ray's own client, to check what the cluster says independently of launch.py."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})


def test_bad_recipe_key_fails_before_contacting_the_cluster(tmp_path: Path) -> None:
    env = {**os.environ, "SMALLSHOT_JOBS_FILE": str(tmp_path / "jobs.jsonl")}
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens: contacting it would fail
    out = launch("submit", RECIPE, "train.no_such_key=1", "--address", closed, env=env)
    assert out.returncode == 2, out.stderr
    assert "no_such_key" in out.stderr and "cannot reach" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "jobs.jsonl").exists()

    outside = tmp_path / "elsewhere.yaml"
    shutil.copy(ROOT / RECIPE, outside)
    out = launch("submit", str(outside), "--address", closed, env=env)
    assert out.returncode == 2 and "outside the project folder" in out.stderr, out.stderr


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:{port}", "cannot reach the Ray dashboard at http://127.0.0.1:{port}"),
    ("ftp://127.0.0.1:{port}", "cluster address 'ftp://127.0.0.1:{port}'"),
    ("http://127.0.0.1:notaport", "cluster address 'http://127.0.0.1:notaport'"),
])
def test_bad_or_unreachable_address_is_named(tmp_path: Path, address: str, expected: str) -> None:
    port = _free_port()
    env = {**os.environ, "SMALLSHOT_JOBS_FILE": str(tmp_path / "jobs.jsonl")}
    out = launch("submit", RECIPE, "--address", address.format(port=port), env=env)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {expected.format(port=port)}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_wrong_or_missing_token_is_refused(head: Head, client_env: dict[str, str]) -> None:
    wrong = launch("submit", RECIPE, "--mode", "train", "--address", head.url,
                   env={**client_env, "RAY_AUTH_TOKEN": "wrong"})
    missing = launch("status", "some-job", "--address", head.url,
                     env={k: v for k, v in client_env.items() if k != "RAY_AUTH_TOKEN"})
    for out, why in ((wrong, "the token was rejected"), (missing, "no token was sent")):
        assert out.returncode == 2, out.stderr
        assert f"refused authentication ({why})" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr
        assert "Traceback" not in out.stderr
        assert head.token not in out.stdout + out.stderr
    assert not Path(client_env["SMALLSHOT_JOBS_FILE"]).exists()


def test_train_job_runs_to_success_and_its_logs_are_readable(
        head: Head, client_env: dict[str, str]) -> None:
    from trainers.recipe import load_config

    out = launch("submit", RECIPE, "--mode", "train", "--address", head.url, env=client_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = _job_id(out.stdout)
    assert f"job {job_id} SUCCEEDED" in out.stdout
    assert _ray_client(head).get_job_status(job_id).value == "SUCCEEDED"
    # The last line the job itself printed while it was being followed.
    streamed = out.stdout.split("\n  entrypoint: ", 1)[1].rsplit(f"job {job_id} SUCCEEDED", 1)[0]
    job_lines = [line for line in streamed.splitlines()[1:]
                 if line.strip() and "Running entrypoint" not in line and " INFO " not in line]
    assert job_lines, f"the job printed nothing:\n{streamed}"

    logs = launch("logs", job_id, "--address", head.url, env=client_env)
    assert logs.returncode == 0, logs.stderr
    assert job_lines[-1].strip() in logs.stdout
    assert "test/accuracy" in logs.stdout  # the trainer's results table

    record = json.loads(Path(client_env["SMALLSHOT_JOBS_FILE"]).read_text().splitlines()[-1])
    assert record["job_id"] == job_id and record["mode"] == "train"
    assert record["digest"] == load_config(ROOT / RECIPE, check_paths=False).digest()
    listed = launch("list", "--address", head.url, env=client_env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert RECIPE in row and row.rstrip().endswith("SUCCEEDED")
    for text in (out.stdout, out.stderr, logs.stdout, listed.stdout,
                 Path(client_env["SMALLSHOT_JOBS_FILE"]).read_text()):
        assert head.token not in text


def test_long_job_is_stopped(head: Head, client_env: dict[str, str]) -> None:
    out = launch("submit", RECIPE, "train.epochs=100000", "--mode", "train", "--no-follow",
                 "--address", head.url, env=client_env)
    assert out.returncode == 0, out.stderr
    job_id = _job_id(out.stdout)
    ray_client = _ray_client(head)
    deadline = time.monotonic() + 30
    while ray_client.get_job_status(job_id).value != "RUNNING":  # stop a live driver, not a queue
        assert time.monotonic() < deadline, ray_client.get_job_info(job_id)
        time.sleep(0.5)

    listed = launch("list", "--address", head.url, env=client_env)
    assert any(line.startswith(job_id) and line.rstrip().endswith("RUNNING")
               for line in listed.stdout.splitlines()), listed.stdout

    stopped = launch("stop", job_id, "--address", head.url, env=client_env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"job {job_id} STOPPED" in stopped.stdout
    assert ray_client.get_job_status(job_id).value == "STOPPED"
    status = launch("status", job_id, "--address", head.url, env=client_env)
    assert re.search(r"^status:\s+STOPPED$", status.stdout, re.M), status.stdout

"""Ray Jobs API: submit recipes to a running Ray cluster, follow, stop and list them.

    python launch.py submit configs/sst2-minilm.yaml optim.lr=3e-4 --address http://head:8265
    python launch.py status <job id>      # also: logs [--follow], stop
    python launch.py list --address http://head:8265

The project folder is shipped as the job's working_dir and the job runs
``python launch.py <mode> <recipe> <overrides...>`` there, so a recipe runs the same on a cluster
as on a laptop. The cluster's token (token authentication) is read from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` - Ray's own order - and sent as a bearer header;
it is never printed, passed to the job or written to the jobs file.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from trainers.errors import ClusterError, ConfigError

if TYPE_CHECKING:  # ray is imported inside functions: `launch.py --help` must stay instant
    from ray.job_submission import JobSubmissionClient

    from trainers.config import RunConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Never shipped: environments, VCS data, outputs and caches (the working_dir upload is capped).
EXCLUDES = [".venv*", ".git", "runs", "benchmarks/results", "__pycache__", "*.egg-info",
            ".pytest_cache", ".ruff_cache", ".mypy_cache", ".hypothesis", "*.pyc"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DASHBOARD_PORT = 8265
CONNECT_TIMEOUT_S = 10.0
TOKEN_HELP = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's "
              "token, printed by `ray get-auth-token` on the head node")


# --------------------------------------------------------------------------------------------
# Connecting


def resolve_address(address: str | None) -> str:
    """The dashboard URL from --address or $RAY_ADDRESS; a bare host[:port] means http, port 8265."""
    raw = address or os.environ.get("RAY_ADDRESS", "")
    if not raw:
        raise ClusterError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    bare = "://" not in raw
    url = f"http://{raw}" if bare else raw
    url = url.rstrip("/")
    parts = urlsplit(url)
    try:
        port = parts.port  # raises ValueError on a malformed or out-of-range port
    except ValueError:
        port = 0
    if port == 0 or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClusterError(f"cluster address {raw!r}: expected the dashboard's http(s)://HOST:PORT "
                           f"(port {DASHBOARD_PORT} by default)")
    if bare and port is None:
        url = f"{url}:{DASHBOARD_PORT}"
    return url


def load_token() -> str | None:
    """The cluster token, looked up where Ray looks: env var, then token file, then ~/.ray."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_env) if path_env else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if path_env:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path_env}: file not found") from None
        return None
    except OSError as e:
        raise ClusterError(f"token file {path}: cannot be read ({e.strerror})") from None
    return token or None


def _check_reachable(url: str) -> None:
    """Fail fast: the Jobs client itself waits on an unreachable host with no timeout."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ClusterError(f"cannot reach the Ray dashboard at {url} ({reason}); is the cluster "
                           f"running and is this its dashboard address?") from None


@contextmanager
def cluster_errors(url: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs client's exceptions into one-line ClusterErrors naming the address or job."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    def refused(no_token: bool) -> ClusterError:
        why = "no token was sent" if no_token else "the token was rejected"
        return ClusterError(f"the Ray cluster at {url} refused authentication ({why}): {TOKEN_HELP}")

    try:
        yield
    except AuthenticationError as e:
        raise refused("required" in str(e).lower()) from None
    except aiohttp.WSServerHandshakeError as e:  # log tailing goes through a websocket
        if e.status in (401, 403):
            raise refused(e.status == 401) from None
        raise ClusterError(f"the Ray cluster at {url} refused to stream logs (HTTP {e.status})") \
            from None
    except (requests.exceptions.ConnectionError, aiohttp.ClientConnectionError,
            ConnectionError) as e:
        raise ClusterError(f"the connection to the Ray dashboard at {url} failed "
                           f"({type(e).__name__}); is this the dashboard's address (port "
                           f"{DASHBOARD_PORT}, not the GCS port)?") from None
    except ValueError:  # a 200 that is not JSON: some other web server
        raise ClusterError(f"{url} did not answer like a Ray dashboard") from None
    except RuntimeError as e:  # the client's wrapper of every other HTTP failure
        text = str(e)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise ClusterError(f"job {job_id!r} not found on the Ray cluster at {url}") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise ClusterError(f"the Ray cluster at {url} failed the request: {first}") from None


def connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A Jobs client for the cluster, authenticated when a token is configured."""
    url = resolve_address(address)
    _check_reachable(url)
    from ray.job_submission import JobSubmissionClient

    token = load_token()
    # Sent explicitly: Ray adds the header itself only when this process runs in token mode.
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with cluster_errors(url):
        return JobSubmissionClient(url, headers=headers), url


# --------------------------------------------------------------------------------------------
# The local record of submissions


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """One submission, as written to the jobs file (never the token, never env values)."""

    job_id: str
    recipe: str
    name: str
    digest: str
    mode: str
    overrides: list[str]
    address: str
    submitted: str
    env: list[str]


def jobs_file() -> Path:
    return Path(os.environ.get("SMALLSHOT_JOBS_FILE") or Path.home() / ".smallshot" / "jobs.jsonl")


def append_record(record: JobRecord) -> Path:
    path = jobs_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:  # one short line per append: no torn records
        f.write(json.dumps(asdict(record), sort_keys=True) + "\n")
    return path


def read_records() -> list[JobRecord]:
    path = jobs_file()
    if not path.is_file():
        return []
    names = {f.name for f in fields(JobRecord)}
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            records.append(JobRecord(**{k: v for k, v in raw.items() if k in names}))
        except (json.JSONDecodeError, TypeError):
            print(f"warning: {path} line {n}: not a job record, skipped", file=sys.stderr)
    return records


# --------------------------------------------------------------------------------------------
# submit


@dataclass(frozen=True)
class Submitted:
    client: JobSubmissionClient
    url: str
    job_id: str
    entrypoint: str


def submit(cfg: RunConfig, recipe: str | Path, overrides: list[str], *, mode: str,
           pip: bool = False, env: list[str] | None = None,
           address: str | None = None) -> Submitted:
    """Submit ``launch.py <mode> <recipe> <overrides>`` as a Ray job and record it locally.

    Everything checkable here (recipe inside the shipped folder, env names) is checked before
    the cluster is contacted."""
    rel = _recipe_in_project(Path(recipe))
    env_vars = _parse_env(env or [])
    entrypoint = job_entrypoint(mode, rel, overrides)
    runtime_env: dict[str, Any] = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}
    if pip:
        runtime_env["pip"] = _requirements()
    if env_vars:
        runtime_env["env_vars"] = env_vars

    client, url = connect(address)
    digest = cfg.digest()
    job_id = f"smallshot-{_slug(cfg.name)}-{digest}-{secrets.token_hex(3)}"
    metadata = {"smallshot.recipe": rel, "smallshot.digest": digest, "smallshot.mode": mode}
    with cluster_errors(url):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   submission_id=job_id, metadata=metadata)
    append_record(JobRecord(
        job_id=job_id, recipe=rel, name=cfg.name, digest=digest, mode=mode,
        overrides=list(overrides), address=url,
        submitted=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        env=sorted(env_vars)))
    return Submitted(client, url, job_id, entrypoint)


def job_entrypoint(mode: str, recipe: str, overrides: list[str]) -> str:
    """The job's command line. Ray runs it through a shell, so every word is quoted."""
    return shlex.join(["python", "launch.py", mode, recipe, *overrides])


def _recipe_in_project(recipe: Path) -> str:
    """The recipe's path inside the shipped working_dir, or a ConfigError saying why it is not."""
    try:
        rel = recipe.resolve().relative_to(PROJECT_ROOT)
    except ValueError:
        raise ConfigError(f"recipe {recipe}: outside the project folder {PROJECT_ROOT}, which is "
                          f"all that is shipped to the cluster; move it under configs/") from None
    for part in rel.parts[:-1]:
        if any(fnmatch.fnmatch(part, pattern) for pattern in EXCLUDES):
            raise ConfigError(f"recipe {recipe}: lies in {part}/, which is not shipped to the "
                              f"cluster; copy it under configs/")
    return rel.as_posix()


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {key!r}: expected KEY=VALUE with KEY a valid variable name")
        if key.startswith("RAY_AUTH_"):  # runtime_env is stored and shown by the dashboard
            raise ConfigError(f"--env {key}: the cluster's jobs already hold its token; never "
                              f"pass it to a job")
        env[key] = value
    return env


def _requirements() -> list[str]:
    path = PROJECT_ROOT / "requirements.txt"
    if not path.is_file():
        raise ConfigError(f"--pip: {path} not found")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"


def follow(client: JobSubmissionClient, url: str, job_id: str) -> str:
    """Stream the job's logs until it ends; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        with cluster_errors(url, job_id):
            asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (stop it with: python launch.py stop "
              f"{job_id} --address {url})", file=sys.stderr)
        raise
    status = wait_for_end(client, url, job_id, timeout_s=30.0)
    _print_outcome(client, url, job_id, status)
    return status or "RUNNING"


def wait_for_end(client: JobSubmissionClient, url: str, job_id: str,
                  timeout_s: float) -> str | None:
    """The job's terminal status, or None if it has not ended within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        with cluster_errors(url, job_id):
            status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def _print_outcome(client: JobSubmissionClient, url: str, job_id: str, status: str | None) -> None:
    if status is None:
        print(f"job {job_id} has not ended yet", file=sys.stderr)
        return
    message = ""
    if status != "SUCCEEDED":
        with cluster_errors(url, job_id):
            info = client.get_job_info(job_id)
        message = f": {info.message}" if info.message else ""
    print(f"job {job_id} {status}{message}", file=sys.stderr if status != "SUCCEEDED" else sys.stdout)


def iso_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")

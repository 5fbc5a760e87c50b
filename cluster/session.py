"""Connecting to Ray: an existing cluster ($RAY_ADDRESS / scaling.address) or a local instance.

A local instance started here listens on the loopback interface only (GCS, raylet, agents,
workers and the dashboard), keeps Ray's token authentication on (Ray's default for clusters it
starts) and keeps the token file private (0600), so nothing listens openly on the network.
``SMALLSHOT_RAY_NODE_IP`` / ``SMALLSHOT_DASHBOARD_HOST`` expose it deliberately.
``ray.init`` is only ever called from these functions, never at import time.

``launch.py up`` keeps such an instance running in a background process (``serve_local``) and
records its address in ``$SMALLSHOT_CACHE/local-ray.json``; commands with no address then
connect to it instead of starting one each (the warm path for short runs: no start-up of a
GCS, raylet and dashboard per command, and Ray's idle worker processes already there).
``launch.py down`` stops it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainers.errors import ClusterError

LOCAL_DASHBOARD_HOST = "127.0.0.1"
NODE_IP_ENV = "SMALLSHOT_RAY_NODE_IP"
# Ray 2.60 replaces a loopback node address by the machine's reachable one (and its gRPC servers
# then listen on every interface) unless this switch, meant for single-machine macOS/Windows
# installs, is off; with it off, every component binds to 127.0.0.1.
RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def ensure_ray(address: str | None = None, **local_kwargs: Any) -> dict[str, float]:
    """Connect (or start a local Ray) once; return the cluster's total resources."""
    import ray

    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS")
        kept = None if target else running_local()
        if kept is not None:
            target = kept["address"]
            print(f"using the local Ray instance kept up by `launch.py up` at {target} "
                  "(`launch.py down` stops it)", flush=True)
            if target.startswith("127.0.0.1:"):
                bind_to_loopback()  # else this driver would look for it at the machine's IP
        try:
            if target:
                ray.init(address=target, log_to_driver=True)
            else:
                start_local(ray, local_kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises bare Exception on a start timeout
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClusterError(f"cannot connect to Ray at {target or 'a new local instance'}: "
                               f"{first[:200]}") from None
    return dict(ray.cluster_resources())


def start_local(ray: Any, kwargs: dict[str, Any]) -> None:
    """A fresh local instance bound to loopback, with a private token when auth is on."""
    kwargs.setdefault("dashboard_host", os.environ.get("SMALLSHOT_DASHBOARD_HOST",
                                                       LOCAL_DASHBOARD_HOST))
    # the dashboard serves the State API that Ray Train's placement-group cleaner uses
    kwargs.setdefault("include_dashboard", True)
    # Ray Train's own actors and Ray's INFO lines talk to the console otherwise: warnings only
    kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
    node_ip = os.environ.get(NODE_IP_ENV)
    if node_ip:
        kwargs.setdefault("_node_ip_address", node_ip)
    else:
        bind_to_loopback()
    token = private_token_file()
    # Ray warns about token auth at every local start; the line printed below says it once
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    # Ray's processes look their cluster up by RAY_ADDRESS, else by scanning the machine, which
    # fails ("Found multiple active Ray instances") where another user's Ray runs: fix the GCS
    # port so the address is known before start, and hand it to the processes Ray starts.
    port = free_port(node_ip or "127.0.0.1")
    started_with = {"RAY_GCS_SERVER_PORT": str(port),
                    "RAY_ADDRESS": f"{node_ip or '127.0.0.1'}:{port}"}
    # Train's preemption watcher (an extra actor per run, observability only) watches for
    # nodes being taken away, which a machine's own instance never sees; a user's value wins
    started_with[PREEMPTION_WATCHER] = os.environ.get(PREEMPTION_WATCHER, "0")
    saved = {k: os.environ.get(k) for k in started_with}
    os.environ.update(started_with)
    try:
        ray.init(address="local", **kwargs)
    finally:  # this process itself keeps its own settings (a later ensure_ray starts afresh)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if token is not None:
        tighten(token)  # in case Ray (re)wrote it with the default umask
    auth = f"token auth, token in {token}" if token is not None else "no token auth"
    print(f"started a local Ray instance at {started_with['RAY_ADDRESS']} (dashboard "
          f"{ray._private.worker.get_dashboard_url()}, {auth})", flush=True)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bind_to_loopback() -> None:
    """Make this process and the Ray processes it starts use 127.0.0.1 as the node address."""
    import ray._private.ray_constants as ray_constants

    os.environ[RAY_CLUSTER_SWITCH] = "0"  # read by the raylet, agents and workers at start
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by this process (imported before we ran)


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def private_token_file() -> Path | None:
    """The token file a local token-auth instance will use, created 0600 when missing.

    Ray 2.60 writes a missing token with the process umask (0644: readable by every user of the
    machine); creating it first with Ray's own generator and mode 0600 closes that window.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if not path.exists():
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile: keep theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(generate_new_authentication_token())
    tighten(path)
    return path


def tighten(path: Path) -> None:
    """Owner-only permissions on a token file this user owns (another user's is left alone)."""
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# A local instance kept up between commands (launch.py up / down)


def kept_file() -> Path:
    """Where the kept instance is recorded ($SMALLSHOT_LOCAL_RAY_FILE moves it: the tests do)."""
    from trainers.io import cache_root

    if os.environ.get("SMALLSHOT_LOCAL_RAY_FILE"):
        return Path(os.environ["SMALLSHOT_LOCAL_RAY_FILE"])
    return cache_root() / "local-ray.json"


def running_local() -> dict[str, Any] | None:
    """The record of the instance ``launch.py up`` keeps, if its process and GCS are alive."""
    path = kept_file()
    try:
        record = json.loads(path.read_text())
        os.kill(int(record["pid"]), 0)
        host, port = record["address"].rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def keep_local_up(num_cpus: int | None = None, num_gpus: int | None = None,
                  timeout: float = 120.0) -> dict[str, Any]:
    """Start ``serve_local`` in a detached process and wait until its instance answers."""
    record = running_local()
    if record is not None:
        return {**record, "already": True}
    path = kept_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    log = path.with_suffix(".log")
    args = [sys.executable, "-m", "cluster.session", json.dumps(
        {"num_cpus": num_cpus, "num_gpus": num_gpus})]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = running_local()
        if record is not None:
            return {**record, "already": False}
        if proc.poll() is not None:
            last = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
            raise ClusterError(f"the local Ray instance did not start ({log}): {last[:200]}")
        time.sleep(0.5)
    proc.terminate()
    raise ClusterError(f"the local Ray instance did not answer within {timeout:.0f} s ({log})")


def stop_kept_local(timeout: float = 60.0) -> dict[str, Any] | None:
    """Stop the instance ``launch.py up`` keeps; None when none runs."""
    path = kept_file()
    record = running_local()
    if record is None:
        path.unlink(missing_ok=True)  # a stale record of an instance that is gone
        return None
    os.kill(int(record["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(int(record["pid"]), 0)
        except OSError:
            path.unlink(missing_ok=True)
            return record
        time.sleep(0.2)
    raise ClusterError(f"the local Ray instance (pid {record['pid']}) did not stop within "
                       f"{timeout:.0f} s")


def serve_local(options: dict[str, Any]) -> None:
    """The kept instance's own process: start it as every local start, record it, wait."""
    import ray

    kwargs = {k: v for k, v in options.items() if v is not None}
    start_local(ray, kwargs)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ctx = ray.get_runtime_context()
    record = {"address": ctx.gcs_address, "pid": os.getpid(), "started": time.time(),
              "dashboard": ray._private.worker.get_dashboard_url(),
              "resources": dict(ray.cluster_resources())}
    from trainers.io import write_json

    path = write_json(kept_file(), record)  # atomic: a reader never sees half a record
    try:
        while not stop.wait(1.0):
            pass
    finally:
        path.unlink(missing_ok=True)
        ray.shutdown()


if __name__ == "__main__":  # the background process of keep_local_up
    serve_local(json.loads(sys.argv[1]))

"""`launch.py up | down`: a local Ray instance kept running between commands.

    python launch.py up            # start it (loopback only, token auth as every local start)
    python launch.py train configs/fewshot-minilm.yaml scaling.num_workers=1   # connects to it
    python launch.py down          # stop it
"""

from __future__ import annotations

import argparse


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs it offers (default: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs it offers (default: all)")


def add_down_args(p: argparse.ArgumentParser) -> None:
    del p  # no options


def run_up(args: argparse.Namespace) -> int:
    from cluster.session import keep_local_up

    record = keep_local_up(args.num_cpus, args.num_gpus)
    state = "already running" if record["already"] else "started"
    cpus = record["resources"].get("CPU", 0)
    gpus = record["resources"].get("GPU", 0)
    print(f"local Ray instance {state} at {record['address']} ({cpus:g} CPUs, {gpus:g} GPUs; "
          f"dashboard {record['dashboard']}): commands without an address use it until "
          "`launch.py down`")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from cluster.session import stop_kept_local

    del args
    record = stop_kept_local()
    print("no local Ray instance kept up" if record is None
          else f"stopped the local Ray instance at {record['address']}")
    return 0

"""`launch.py submit | status | logs | stop | list`: Ray Jobs on a running cluster.

    python launch.py submit configs/sst2-minilm.yaml optim.lr=3e-4 --address http://head:8265
    python launch.py status <job id>      # also: logs [--follow], stop
    python launch.py list --address http://head:8265
"""

from __future__ import annotations

import argparse
import sys

MODES = ("tune", "train")  # what a job runs: `launch.py <mode> <recipe> <overrides>`


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe inside the project folder (e.g. configs/x.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    _add_address(p)
    p.add_argument("--mode", choices=MODES, default="tune",
                   help="run `launch.py tune` (a sweep) or `launch.py train` (one run); default tune")
    p.add_argument("--pip", action="store_true",
                   help="install requirements.txt into the job's environment (slow: prefer an "
                   "image that has them)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="environment variable for the job (repeatable; the dashboard shows "
                   "it, so no secrets)")
    p.add_argument("--no-follow", action="store_true",
                   help="return after submitting instead of tailing the logs to the end")


def run_submit(args: argparse.Namespace) -> int:
    from cluster import jobs
    from trainers.recipe import load_config

    # everything checkable here is checked before the cluster is contacted
    cfg = load_config(args.recipe, args.overrides, check_paths=False)
    job = jobs.submit(cfg, args.recipe, args.overrides, mode=args.mode, pip=args.pip,
                      env=args.env, address=args.address)
    print(f"submitted {job.job_id} to {job.url}")
    print(f"  entrypoint: {job.entrypoint}")
    if args.no_follow:
        print(f"  follow with: python launch.py logs {job.job_id} --follow --address {job.url}")
        return 0
    return 0 if jobs.follow(job.client, job.url, job.job_id) == "SUCCEEDED" else 1



def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray dashboard address, e.g. http://head:8265 (default $RAY_ADDRESS)")


def _add_job_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", help="the id printed by `launch.py submit` (or a Ray job id)")
    _add_address(p)


def add_status_args(p: argparse.ArgumentParser) -> None:
    _add_job_id(p)


def run_status(args: argparse.Namespace) -> int:
    from cluster import jobs

    client, url = jobs.connect(args.address)
    with jobs.cluster_errors(url, args.job_id):
        info = client.get_job_info(args.job_id)
    rows = {"job": args.job_id, "status": info.status.value, "message": info.message,
            "entrypoint": info.entrypoint, "started": jobs.iso_ms(info.start_time),
            "ended": jobs.iso_ms(info.end_time), "exit code": info.driver_exit_code}
    rows.update({k.removeprefix("smallshot."): v for k, v in (info.metadata or {}).items()})
    for key, value in rows.items():
        if value not in (None, ""):
            print(f"{key + ':':<12}{value}")
    return 0


def add_logs_args(p: argparse.ArgumentParser) -> None:
    _add_job_id(p)
    p.add_argument("--follow", "-f", action="store_true", help="keep tailing until the job ends")


def run_logs(args: argparse.Namespace) -> int:
    from cluster import jobs

    client, url = jobs.connect(args.address)
    if args.follow:
        return 0 if jobs.follow(client, url, args.job_id) == "SUCCEEDED" else 1
    with jobs.cluster_errors(url, args.job_id):
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def add_stop_args(p: argparse.ArgumentParser) -> None:
    _add_job_id(p)
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="wait this long for the job to end (0 = return at once); default 60")


def run_stop(args: argparse.Namespace) -> int:
    from cluster import jobs

    client, url = jobs.connect(args.address)
    with jobs.cluster_errors(url, args.job_id):
        was_running = client.stop_job(args.job_id)
    if not was_running:
        with jobs.cluster_errors(url, args.job_id):
            status = client.get_job_status(args.job_id).value
        print(f"job {args.job_id} had already ended: {status}")
        return 0
    if args.wait <= 0:
        print(f"stop requested for {args.job_id}")
        return 0
    status = jobs.wait_for_end(client, url, args.job_id, args.wait)
    if status is None:
        print(f"job {args.job_id} is still running {args.wait:g} s after the stop request",
              file=sys.stderr)
        return 1
    print(f"job {args.job_id} {status}")
    return 0


def add_list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="also show each job's current status on this cluster")
    p.add_argument("--last", type=int, default=20, metavar="N", help="newest N jobs (default 20)")


def run_list(args: argparse.Namespace) -> int:
    from cluster import jobs

    records = jobs.read_records()[-args.last:] if args.last > 0 else jobs.read_records()
    if not records:
        print(f"no jobs submitted yet ({jobs.jobs_file()})")
        return 0
    statuses: dict[str, str] | None = None
    if args.address:
        client, url = jobs.connect(args.address)
        with jobs.cluster_errors(url):
            statuses = {j.submission_id: j.status.value for j in client.list_jobs()
                        if j.submission_id}
    header = ["JOB ID", "SUBMITTED", "MODE", "RECIPE", "DIGEST", "ADDRESS"]
    rows = [[r.job_id, r.submitted, r.mode, " ".join([r.recipe, *r.overrides]), r.digest,
             r.address] for r in records]
    if statuses is not None:
        header.append("STATUS")
        for row, r in zip(rows, records):
            row.append(statuses.get(r.job_id, "-"))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0

"""Where a short Ray Train run's time goes: ``launch.py train`` in process vs on 1 worker.

A few-shot run (``configs/fewshot-minilm.yaml``: 16 SST-2 sentences, the contrastive stage and
10 epochs) is started as a user starts it, each time in a new process: in process
(``scaling.num_workers=0``); on Ray Train with one worker on a local instance the command
starts (``ray.init`` included), with Train's preemption watcher on (Ray's default) and off (the
default of smallshot's local instances); and on Ray Train with one worker on the instance
``launch.py up`` keeps (the warm path); the cases taking turns. For the Ray Train runs, the records a run leaves
(``workers/driver.json``, ``workers/rank-0.json``) split the time after ``TorchTrainer.fit``
is called: until the worker process exists (Train's controller and helper actors start), from
there to the worker function (the process's imports, the worker group's set-up), to ``fit``
(the function's imports, checkpoint check), ``fit`` itself, and back to the driver.

    python -m benchmarks.train_startup               # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    SST2,
    in_turn,
    markdown_table,
    need_sst2,
    timed_launch,
    write_results,
)

KEPT = "Ray Train, 1 worker, instance kept up (launch.py up)"
CASES = {  # name -> (overrides, extra environment)
    "in process": (["scaling.num_workers=0"], {}),
    "Ray Train, 1 worker, preemption watcher on (Ray's default)": (
        ["scaling.num_workers=1"], {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}),
    "Ray Train, 1 worker": (["scaling.num_workers=1"], {}),
    KEPT: (["scaling.num_workers=1"], {}),
}
PHASES = (("to the worker process", "fit_called", "process_started"),
          ("process start to worker function", "process_started", "entered"),
          ("worker function to fit", "entered", "fit_started"),
          ("fit", "fit_started", "fit_ended"),
          ("back to the driver", "fit_ended", "fit_returned"))


def launch_env(out: Path, kept: bool) -> dict[str, str]:
    """Only the kept case sees the record of the instance ``launch.py up`` keeps."""
    record = out / ("local-ray.json" if kept else "no-local-ray.json")
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
            "SMALLSHOT_LOCAL_RAY_FILE": str(record)}


def run(out: Path, case: str, rep: int) -> dict[str, Any]:
    overrides, env = CASES[case]
    name = f"case{list(CASES).index(case)}-{rep}"
    proc, wall = timed_launch(
        ["train", "configs/fewshot-minilm.yaml", f"data.root={SST2}", f"train.output_dir={out}",
         f"train.run_name={name}", "train.epochs=10", "train.num_threads=1",
         "scaling.cpus_per_worker=1", *overrides], {**launch_env(out, case == KEPT), **env})
    res: dict[str, Any] = {"wall_s": round(wall, 2)}
    workers = out / name / "workers"
    if (workers / "driver.json").is_file():
        times = {**json.loads((workers / "rank-0.json").read_text()),
                 **json.loads((workers / "driver.json").read_text())}
        res["phases_s"] = {p: round(times[b] - times[a], 2) for p, a, b in PHASES}
    return res


def markdown(res: dict[str, Any]) -> str:
    cases = res["cases"]
    base = statistics.median(r["wall_s"] for r in cases["in process"])
    rows = []
    for case, reps in cases.items():
        wall = statistics.median(r["wall_s"] for r in reps)
        phases = [statistics.median(r["phases_s"][p] for r in reps) if "phases_s" in reps[0]
                  else None for p, _, _ in PHASES]
        rows.append([case, f"{wall:.1f}", f"{wall - base:+.1f}",
                     *("—" if v is None else f"{v:.1f}" for v in phases)])
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    return ("# Start-up of a short run: in process vs Ray Train with 1 worker\n\n"
            f"`python -m benchmarks.train_startup --reps {res['reps']}`: `launch.py train "
            "configs/fewshot-minilm.yaml` (16 SST-2 sentences, contrastive stage + 10 epochs, "
            "300 test sentences, 1 thread), each run a new process as a user starts it "
            "(`ray.init` of a local instance included, except on the instance kept up by "
            f"`launch.py up`), the cases taking turns; medians over {res['reps']} rep(s), "
            "seconds.\n\n"
            + markdown_table(["case", "wall", "vs in process",
                              *(p for p, _, _ in PHASES)], rows)
            + "\nPhases (Ray Train only) come from the run's `workers/driver.json` and "
            "`workers/rank-0.json`, counted from the moment `TorchTrainer.fit` is called.\n\n"
            f"Machine: {res['machine']['cpus']} cores shared with other agents' jobs (load "
            f"average {load} at the end): absolute times are noisy; the cases ran in turn in "
            "one run.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    need_sst2()
    with tempfile.TemporaryDirectory(prefix="smallshot-startup-") as tmp:
        keep = [sys.executable, "launch.py"]
        subprocess.run([*keep, "up", "--num-cpus", "2"], cwd=ROOT, check=True,
                       env=launch_env(Path(tmp), True))
        try:
            cases = in_turn(list(CASES), args.reps, lambda c, rep: run(Path(tmp), c, rep))
        finally:
            subprocess.run([*keep, "down"], cwd=ROOT, check=False,
                           env=launch_env(Path(tmp), True))
    res = {"cases": cases, "reps": args.reps, "load_average": list(os.getloadavg()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    print(write_results("train_startup", res, markdown(res)).read_text())


if __name__ == "__main__":
    main()

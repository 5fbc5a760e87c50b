"""The README's few-shot selection, end to end: wall time vs the trials' pure training time.

Runs ``launch.py tune configs/fewshot-minilm.yaml data.folds=2`` (4 trials x 2 folds on one
SST-2 draw of 8 shots per class, then one final run of the best config on the test split) as a
user would, in a new process, once with a fresh process per trial (``tune.reuse_runners=false``,
the old path) and once with warm runners (the default), the two taking turns. Pure training is
what every run spends learning and scoring - ``trainers.timing`` phases ``strategy`` (the
contrastive / probe stage), ``train`` and ``evaluate`` - summed over the 8 fold runs and the
final run. Goal: wall <= 1.5x that sum.

    python -m benchmarks.fewshot_selection            # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import SST2, markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
PURE = ("strategy", "train", "evaluate")
MODES = {"fresh": "false", "warm": "true"}


def run_selection(out: Path, mode: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``launch.py tune`` of the README's selection in a new process (``extra``: more
    overrides), timed; what its runs spent per phase."""
    cmd = [sys.executable, "launch.py", "tune", "configs/fewshot-minilm.yaml", "data.folds=2",
           f"data.root={SST2}", f"train.output_dir={out}", f"tune.name=select-{mode}",
           "tune.final_seeds=1", f"tune.reuse_runners={MODES.get(mode, 'true')}", *extra,
           "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    sweep = out / "sweeps" / f"select-{mode}"
    runs = sorted(sweep.glob("runs/*/fold-*/result.json")) + sorted(
        sweep.glob("final/seed-*/result.json"))
    timings = [json.loads(p.read_text()).get("timings", {}) for p in runs]
    pure = sum(t.get(k, 0.0) for t in timings for k in PURE)
    fit_total = sum(sum(t.values()) for t in timings)
    trials = [json.loads(p.read_text()) for p in sweep.glob("runs/*/trial.json")]
    pids = {t["pid"] for t in trials}
    plan = re.search(r"resource plan: (\d+) trial", proc.stdout)
    return {"wall_s": round(wall, 1), "concurrency": int(plan.group(1)) if plan else None, "runs": len(runs), "pure_training_s": round(pure, 1),
            "fit_total_s": round(fit_total, 1), "ratio": round(wall / pure, 2),
            "trial_processes": len(pids), "trials": trials,
            "phases_s": {k: round(sum(t.get(k, 0.0) for t in timings), 2)
                         for k in dict.fromkeys(k for t in timings for k in t)}}


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for mode, r in res["modes"].items():
        ok = "✓" if r["ratio"] <= 1.5 else "✗"
        rows.append([mode, str(r["trial_processes"]), f"{r['wall_s']:.1f}",
                     f"{r['pure_training_s']:.1f}", f"{r['fit_total_s']:.1f}",
                     f"**{r['ratio']:.2f}x** (goal ≤ 1.5) {ok}"])
    phases = sorted({k for r in res["modes"].values() for k in r["phases_s"]})
    phase_rows = [[k] + [f"{r['phases_s'].get(k, 0.0):.2f}" for r in res["modes"].values()]
                  for k in phases]
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    return ("# Few-shot selection end to end (`launch.py tune configs/fewshot-minilm.yaml "
            "data.folds=2`)\n\n"
            + markdown_table(["runners", "trial processes", "wall (s)", "pure training (s)",
                              "all of fit (s)", "wall / pure training"], rows)
            + f"\nOne SST-2 draw (8 shots per class), 4 trials x 2 folds + 1 final run "
            f"(tune.final_seeds=1) = {res['modes']['warm']['runs']} runs; wall includes the "
            f"new process, `ray.init`, the sweep and the report. Pure training = "
            f"`trainers.timing` phases {', '.join(PURE)} summed over the runs (trials run "
            f"{res['modes']['warm']['concurrency']} at a time, so wall may be below the sum).\n\n"
            "## Seconds per fit phase, summed over the runs\n\n"
            + markdown_table(["phase", *res["modes"]], phase_rows)
            + f"\nMachine: {res['machine']['cpus']} cores shared with other agents' jobs (load "
            f"average {load} at the end): absolute times are noisy; the ratio between the two "
            f"rows, measured one after the other in one run, is what counts.\n")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if not SST2.is_dir():
        sys.exit(f"error: {SST2} is absent (shared data lives in ../shared beside the repo)")
    with tempfile.TemporaryDirectory(prefix="smallshot-select-") as tmp:
        modes = {m: run_selection(Path(tmp), m) for m in MODES}
    res = {"modes": modes, "load_average": list(os.getloadavg()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    for mode, r in modes.items():
        print(f"{mode}: wall {r['wall_s']} s, pure training {r['pure_training_s']} s, "
              f"ratio {r['ratio']}", flush=True)
    print(write_results("fewshot_selection", res, markdown(res)).read_text())


if __name__ == "__main__":
    main()

"""The README's few-shot selection, end to end: wall time vs the trials' pure training time.

Runs ``launch.py tune configs/fewshot-minilm.yaml data.folds=2`` over the grid strategy
{contrastive, lp-ft} x train.epochs {0, 10} (pinned: 4 points x 2 folds on one SST-2 draw of 8
shots per class, then one final run of the best config on the test split) as a user would, in
a new process, once per mode, one after another: ``fresh`` (a new process per trial,
``tune.reuse_runners=false``), ``warm`` (warm runners), ``shared`` (warm runners, and trials
that differ only after the strategy share its prepared model per fold,
``tune.reuse_prepared``) and ``epochs`` (shared, and one trial per strategy scored after 0 and
10 epochs, ``tune.share_epochs``: the default). Pure training is what every run spends learning and
scoring - ``trainers.timing`` phases ``strategy`` (the contrastive / probe stage), ``train``
and ``evaluate`` - summed over the fold runs and the final run. Goal: wall <= 1.5x that sum.
Every mode must score each trial the same (the CV scores are compared).

    python -m benchmarks.fewshot_selection [--modes warm shared]   # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, SST2, markdown_table, timed_launch, write_results

PURE = ("strategy", "train", "evaluate")
MODES = {"fresh": ["tune.reuse_runners=false", "tune.reuse_prepared=false",
                   "tune.share_epochs=false"],
         "warm": ["tune.reuse_runners=true", "tune.reuse_prepared=false",
                  "tune.share_epochs=false"],
         "shared": ["tune.reuse_runners=true", "tune.reuse_prepared=true",
                    "tune.share_epochs=false"],
         "epochs": ["tune.reuse_runners=true", "tune.reuse_prepared=true",
                    "tune.share_epochs=true"]}
# the grid these modes differ on: strategy x end-to-end epochs (pinned, whatever the recipe's
# own tune.space is now)
GRID = ["tune.space={model.strategy: 'grid[contrastive, lp-ft]', train.epochs: 'grid[0, 10]'}",
        "tune.prefer={model.strategy: contrastive, train.epochs: 0}", "tune.refit=retrain"]


def run_selection(out: Path, mode: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``launch.py tune`` of the README's selection in a new process (``extra``: more
    overrides), timed; what its runs spent per phase."""
    proc, wall = timed_launch(
        ["tune", "configs/fewshot-minilm.yaml", "data.folds=2", f"data.root={SST2}",
         f"train.output_dir={out}", f"tune.name=select-{mode}", "tune.final_seeds=1", *GRID,
         *MODES.get(mode, []), *extra, "--overwrite"],
        {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})
    sweep = out / "sweeps" / f"select-{mode}"
    runs = sorted(sweep.glob("runs/*/fold-*/result.json")) + sorted(
        sweep.glob("final/seed-*/result.json"))
    timings = [json.loads(p.read_text()).get("timings", {}) for p in runs]
    pure = sum(t.get(k, 0.0) for t in timings for k in PURE)
    fit_total = sum(sum(t.values()) for t in timings)
    trials = [json.loads(p.read_text()) for p in sweep.glob("runs/*/trial.json")]
    pids = {t["pid"] for t in trials}
    scores = {}
    for t in trials:  # the CV score each trial reported last, by its sampled params
        rows = (sweep / t["trial_id"] / "result.json").read_text().splitlines()
        last = json.loads(rows[-1]) if rows else {}
        shared = {int(k.split("=")[1]): v for k, v in last.items()  # one trial per epochs value
                  if k.startswith("val/accuracy@epochs=") and not k.endswith("_std")}
        for epochs, value in (shared.items() if shared else [(None, last.get("val/accuracy"))]):
            params = t["params"] if epochs is None else {**t["params"], "train.epochs": epochs}
            scores[", ".join(f"{k}={v}" for k, v in sorted(params.items()))] = value
    plan = re.search(r"resource plan: (\d+) trial", proc.stdout)
    return {"wall_s": round(wall, 1), "concurrency": int(plan.group(1)) if plan else None, "runs": len(runs), "pure_training_s": round(pure, 1),
            "fit_total_s": round(fit_total, 1), "ratio": round(wall / pure, 2),
            "trial_processes": len(pids), "trials": trials, "cv_scores": scores,
            "phases_s": {k: round(sum(t.get(k, 0.0) for t in timings), 2)
                         for k in dict.fromkeys(k for t in timings for k in t)}}


def markdown(res: dict[str, Any]) -> str:
    modes = res["modes"]
    base = modes.get("warm") or next(iter(modes.values()))
    rows = []
    for mode, r in modes.items():
        ok = "✓" if r["ratio"] <= 1.5 else "✗"
        rows.append([mode, str(r["trial_processes"]), f"{r['wall_s']:.1f}",
                     f"{r['wall_s'] / base['wall_s']:.2f}x",
                     f"{r['pure_training_s']:.1f}", f"{r['fit_total_s']:.1f}",
                     f"**{r['ratio']:.2f}x** (goal ≤ 1.5) {ok}"])
    phases = sorted({k for r in modes.values() for k in r["phases_s"]})
    phase_rows = [[k] + [f"{r['phases_s'].get(k, 0.0):.2f}" for r in modes.values()]
                  for k in phases]
    same = len({json.dumps(r["cv_scores"], sort_keys=True) for r in modes.values()}) == 1
    score_rows = [[k] + [f"{r['cv_scores'].get(k)}" for r in modes.values()]
                  for k in sorted(base["cv_scores"])]
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    return ("# Few-shot selection end to end (`launch.py tune configs/fewshot-minilm.yaml "
            "data.folds=2`)\n\n"
            + markdown_table(["mode", "trial processes", "wall (s)", "wall vs warm",
                              "pure training (s)", "all of fit (s)", "wall / pure training"],
                             rows)
            + f"\nOne SST-2 draw (8 shots per class), the grid strategy {{contrastive, lp-ft}} x "
            f"train.epochs {{0, 10}} (4 points) x 2 folds + 1 final run (tune.final_seeds=1); wall includes the new process, "
            f"`ray.init`, the sweep and the report. Modes: fresh = a new process per trial; warm "
            f"= warm runners; shared = warm runners + trials that differ only after the "
            f"strategy share its prepared model per fold (`tune.reuse_prepared`; its loads are "
            f"the `prepared` phase), a trial per train.epochs value; epochs = shared + one trial "
            f"per strategy scored after 0 and 10 epochs (`tune.share_epochs`; both on by "
            f"default). Pure training = `trainers.timing` phases "
            f"{', '.join(PURE)} summed over the runs (trials run {base['concurrency']} at a "
            f"time, so wall may be below the sum).\n\n"
            "## Seconds per fit phase, summed over the runs\n\n"
            + markdown_table(["phase", *modes], phase_rows)
            + "\n## The CV score (val/accuracy, mean of 2 folds) of each trial\n\n"
            + markdown_table(["trial", *modes], score_rows)
            + f"\n{'Every mode scored every trial the same.' if same else 'The modes DIFFER.'}"
            f"\n\nMachine: {res['machine']['cpus']} cores shared with other agents' jobs (load "
            f"average {load} at the end): absolute times are noisy; the ratios between the "
            f"rows, measured one after the other in one run, are what counts.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    if not SST2.is_dir():
        sys.exit(f"error: {SST2} is absent (shared data lives in ../shared beside the repo)")
    with tempfile.TemporaryDirectory(prefix="smallshot-select-") as tmp:
        modes = {m: run_selection(Path(tmp), m) for m in args.modes}
    res = {"modes": modes, "load_average": list(os.getloadavg()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    for mode, r in modes.items():
        print(f"{mode}: wall {r['wall_s']} s, pure training {r['pure_training_s']} s, "
              f"ratio {r['ratio']}", flush=True)
    print(write_results("fewshot_selection", res, markdown(res)).read_text())


if __name__ == "__main__":
    main()

"""The README's few-shot selection with Ray's worker processes preloading torch and
transformers (cluster/session.py, the default) vs without.

``launch.py tune configs/fewshot-minilm.yaml data.folds=2`` on one SST-2 draw of 8 shots per
class, each run in a new process that starts its own local Ray instance: the grid's two trials
(the recipe, its folds side by side, and the probe alone), then the final model. The modes take
turns. Reported: the whole command's wall time, and each trial's span from its process's first
fold start to its last fold end.

    python -m benchmarks.ray_preload            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, in_turn, markdown_table, need_sst2, timed_launch, write_results
from cluster.session import PRELOAD, PRELOADED

MODES = {"preloaded": PRELOADED, "not preloaded": ""}


def run(out: Path, mode: str, rep: int) -> dict[str, Any]:
    name = f"{'pre' if MODES[mode] else 'cold'}-{rep}"
    _, wall = timed_launch(["tune", "configs/fewshot-minilm.yaml", "data.folds=2",
                            f"train.output_dir={out}", f"tune.name={name}", "tune.final_seeds=1",
                            "--overwrite"],
                           {**os.environ, "PYTHONPATH": str(ROOT), PRELOAD: MODES[mode]})
    trials = [json.loads(p.read_text())
              for p in sorted((out / "sweeps" / name).glob("runs/*/trial.json"))]
    spans = {",".join(f"{k}={v}" for k, v in t["params"].items()):
             round(max(f["ended"] for f in t["folds"]) - min(f["started"] for f in t["folds"]), 1)
             for t in trials}
    starts = [f["started"] for t in trials for f in t["folds"]]
    ends = [f["ended"] for t in trials for f in t["folds"]]
    return {"wall_s": round(wall, 1), "trial_spans_s": spans,
            "folds_span_s": round(max(ends) - min(starts), 1)}


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for mode, reps in res["modes"].items():
        rows.append([mode, f"{statistics.median(r['wall_s'] for r in reps):.1f}",
                     f"{statistics.median(r['folds_span_s'] for r in reps):.1f}",
                     "; ".join(f"{k}: {v:.1f}" for k, v in reps[0]["trial_spans_s"].items())])
    on, off = (res["modes"][m] for m in MODES)
    ratio = (statistics.median(r["wall_s"] for r in on)
             / statistics.median(r["wall_s"] for r in off))
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    return ("# Few-shot selection with Ray's workers preloading torch and transformers\n\n"
            f"`python -m benchmarks.ray_preload --reps {res['reps']}`: `launch.py tune "
            "configs/fewshot-minilm.yaml data.folds=2 tune.final_seeds=1` on one SST-2 draw "
            "(8 shots per class), each run a new process with its own local Ray instance; the "
            f"modes take turns (medians over {res['reps']} rep(s)). `{PRELOAD}` is "
            f"`{PRELOADED}` (the default of cluster/session.py) or empty.\n\n"
            + markdown_table(["mode", "command wall (s)", "first fold start to last fold end (s)",
                              "per trial: first fold start to last fold end (s), rep 1"], rows)
            + f"\nPreloaded / not preloaded: whole command **{ratio:.2f}x**.\n\n"
            f"Machine: {res['machine']['cpus']} cores, shared (load average {load} at the end): "
            "absolute times are noisy; the modes ran in turn in one run.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    need_sst2()
    with tempfile.TemporaryDirectory(prefix="smallshot-preload-") as tmp:
        modes = in_turn(list(MODES), args.reps, lambda m, rep: run(Path(tmp), m, rep))
    res = {"modes": modes, "reps": args.reps, "load_average": list(os.getloadavg()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    print(write_results("ray_preload", res, markdown(res)).read_text())


if __name__ == "__main__":
    main()

"""k-fold selection with folds side by side vs one after another, end to end.

One config of ``configs/fewshot-minilm.yaml`` (contrastive + 10 epochs) scored by k-fold CV on
one SST-2 draw of 8 shots per class: a single trial, so the planner has room to give it its
folds at once (``tune.parallel_folds=0``, the default: one fold in the trial process, the
others as Ray tasks in its placement group) - against ``tune.parallel_folds=1`` (the folds in
turn in the trial process). The two take turns, each in a new ``launch.py tune`` process; no
final run. Reported: wall time, the span from the first fold's start to the last fold's end,
and the fold scores, which must be the same in both.

    python -m benchmarks.parallel_folds               # ~6 min on 2 cores
    python -m benchmarks.parallel_folds --folds 4 --reps 1
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

from benchmarks.common import in_turn, markdown_table, need_sst2, write_results
from benchmarks.fewshot_selection import run_selection

MODES = {"side by side": 0, "one after another": 1}
ONE_CONFIG = "tune.space={model.strategy: 'grid[contrastive]', train.epochs: 'grid[10]'}"


def run(out: Path, mode: str, folds: int, rep: int) -> dict[str, Any]:
    name = f"{'side' if MODES[mode] == 0 else 'turns'}-{rep}"
    r = run_selection(out, name, (ONE_CONFIG, f"data.folds={folds}", "tune.final_seeds=0",
                                  f"tune.parallel_folds={MODES[mode]}"))
    [trial] = r["trials"]
    spans = trial["folds"]
    [result] = (out / "sweeps" / f"select-{name}").glob("*/result.json")  # Tune's rows
    scores = [json.loads(line)["val/accuracy_fold"] for line in result.read_text().splitlines()]
    return {"wall_s": r["wall_s"], "folds_at_once": trial["folds_at_once"],
            "fold_span_s": round(max(f["ended"] for f in spans)
                                 - min(f["started"] for f in spans), 1),
            "fold_s": [round(f["ended"] - f["started"], 1) for f in spans],
            "processes": len({f["pid"] for f in spans}), "pure_training_s": r["pure_training_s"],
            "fold_scores": scores}


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for mode, reps in res["modes"].items():
        wall = statistics.median(r["wall_s"] for r in reps)
        span = statistics.median(r["fold_span_s"] for r in reps)
        rows.append([mode, str(reps[0]["folds_at_once"]), str(reps[0]["processes"]),
                     f"{wall:.1f}", f"{span:.1f}",
                     ", ".join(f"{s:.1f}" for s in reps[0]["fold_s"])])
    side, turns = (res["modes"][m] for m in MODES)
    ratio = (statistics.median(r["fold_span_s"] for r in side)
             / statistics.median(r["fold_span_s"] for r in turns))
    wall = (statistics.median(r["wall_s"] for r in side)
            / statistics.median(r["wall_s"] for r in turns))
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    return (f"# k-fold selection: folds side by side vs one after another\n\n"
            f"`python -m benchmarks.parallel_folds --folds {res['folds']} --reps "
            f"{res['reps']}`: one config (fewshot-minilm, contrastive + 10 epochs), "
            f"{res['folds']}-fold CV on one SST-2 draw of 8 shots per class, one trial, no final "
            f"run; the two modes take turns, each in a new `launch.py tune` process "
            f"(medians over {res['reps']} rep(s)).\n\n"
            + markdown_table(["mode", "folds at once", "processes", "wall (s)",
                              "first fold start to last fold end (s)", "per fold (s), rep 1"], rows)
            + f"\nSide by side / one after another: folds **{ratio:.2f}x**, whole command "
            f"{wall:.2f}x. Fold scores identical in both modes: "
            f"{'yes' if res['same_scores'] else 'NO'}. A fold in a Ray task starts in a fresh "
            f"worker process (imports, model load), which the trial's own fold does not pay.\n\n"
            f"Machine: {res['machine']['cpus']} cores, 1 CPU (1 torch thread) per fold, shared "
            f"with other agents' jobs (load average {load} at the end): absolute times are "
            f"noisy; the modes ran in turn in one run.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    need_sst2()
    with tempfile.TemporaryDirectory(prefix="smallshot-folds-") as tmp:
        modes = in_turn(list(MODES), args.reps,
                        lambda m, rep: run(Path(tmp), m, args.folds, rep))
    res = {"modes": modes, "folds": args.folds, "reps": args.reps,
           "same_scores": len({tuple(r["fold_scores"]) for reps in modes.values()
                               for r in reps}) == 1, "load_average": list(os.getloadavg()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    print(write_results("parallel_folds", res, markdown(res)).read_text())


if __name__ == "__main__":
    main()

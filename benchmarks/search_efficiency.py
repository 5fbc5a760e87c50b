"""Search efficiency: trial-epochs until ASHA + random / ASHA + Optuna first match a full grid.

The space is discretised so the grid can cover it: optimizer x learning rate, on one of two
tasks. ``digits``: tiny-digits (K=20 per class, 10 validation examples per class), 3 optimizers
x 8 learning rates (1e-4 .. 3e-1), 6 epochs. ``minilm``: few-shot SST-2 with all-MiniLM-L6-v2
(K=16 per class, 32 validation sentences per class drawn disjoint from the shots, end-to-end
fine-tuning), 2 optimizers x 6 learning rates (1e-5 .. 3e-3), 5 epochs. Training is seeded,
so a config scores the same whichever search runs it. The grid trains every config
for every epoch; its best validation accuracy is the target. Each searcher then runs, one
trial at a time (so "first" is well defined), with twice as many trials as the grid has
configs (ASHA trials are short: the budget is in trials, the cost in epochs), under ASHA
(grace 1 epoch, reduction factor 3); its cost is the number of epochs trained, over all
trials in order, until some trial's validation accuracy reaches the target. Several search
seeds; "not reached" counts the searcher's whole spend.

    python -m benchmarks.search_efficiency                # digits, ~6 min on 2 cores
    python -m benchmarks.search_efficiency --task minilm --seeds 5   # ~25 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import SST2, markdown_table, write_results
from trainers.config import RunConfig
from trainers.metrics import mean_std
from trainers.recipe import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
METRIC = "val/accuracy"
BUDGET = 2  # searcher trials per grid config


@dataclass(frozen=True)
class Task:
    recipe: str
    overrides: tuple[str, ...]
    optimizers: tuple[str, ...]
    lrs: tuple[float, ...]
    epochs: int
    title: str


TASKS = {
    "digits": Task("tiny-digits.yaml", (), ("sgd", "momentum", "adam"),
                   (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), 6, "tiny-digits"),
    "minilm": Task("fewshot-minilm.yaml",
                   (f"data.root={SST2}", "data.shots=16", "data.val_shots=32",
                    "data.test_split=null", "model.strategy=full", "optim.schedule=constant",
                    "train.batch_size=8", "train.num_threads=1", "tune.prefer={}",
                    "tune.refit=retrain"),
                   ("momentum", "adamw"), (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3), 5,
                   "few-shot SST-2, all-MiniLM-L6-v2, K=16"),
}


def recipe(task: Task, out: Path, name: str, search: str, scheduler: str,
           samples: int) -> RunConfig:
    lrs = ", ".join(f"{lr:g}" for lr in task.lrs)
    return load_config(CONFIGS / task.recipe, [
        *task.overrides,
        f"train.output_dir={out}", f"train.epochs={task.epochs}", "train.save_checkpoints=false",
        f"tune.space={{optim.name: 'choice[{', '.join(task.optimizers)}]', "
        f"optim.lr: 'choice[{lrs}]'}}",
        f"tune.search={search}", f"tune.scheduler={scheduler}", f"tune.num_samples={samples}",
        "tune.max_concurrent=1", "tune.grace_period=1", "tune.reduction_factor=3",
        "tune.final_seeds=0", f"tune.name={name}"])


def trial_epochs(sweep: Path) -> list[tuple[dict[str, Any], list[float]]]:
    """Per trial, in the order trials ran: its params and its validation accuracy per epoch."""
    trials = []
    for run in (sweep / "runs").iterdir():
        record = json.loads((run / "trial.json").read_text())
        rows = [json.loads(line) for line in
                (sweep / run.name / "result.json").read_text().splitlines()]
        # one report per evaluation; the last evaluation comes in the final row, where METRIC
        # is the run's best and the evaluation's own value is last_METRIC (trainers.metrics)
        accs = [r.get(f"last_{METRIC}", r[METRIC]) for r in rows]
        trials.append((record["started"], record["params"], accs))
    return [(p, a) for _, p, a in sorted(trials, key=lambda t: t[0])]


def cost_to_reach(trials: list[tuple[dict, list[float]]], target: float) -> tuple[int, bool]:
    spent = 0
    for _, accs in trials:
        for acc in accs:
            spent += 1
            if acc >= target - 1e-9:
                return spent, True
    return spent, False


def save(res: dict[str, Any]) -> Path:
    """Write what has been measured so far (an interrupted run keeps its finished parts)."""
    res = {**res, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    name = "search_efficiency" + ("" if res["task"] == "digits" else f"_{res['task']}")
    return write_results(name, res, markdown(res))


def run(task_name: str, seeds: int, out: Path) -> dict[str, Any]:
    from cluster.session import ensure_ray
    from cluster.tune import run_sweep, sweep_dir_of

    task = TASKS[task_name]
    ensure_ray(None, num_cpus=2)
    grid_size = len(task.optimizers) * len(task.lrs)
    t0 = time.perf_counter()
    cfg = recipe(task, out, "grid", "grid", "none", 1)
    run_sweep(cfg, overwrite=True)
    grid = trial_epochs(sweep_dir_of(cfg))
    grid_wall = time.perf_counter() - t0
    assert len(grid) == grid_size, f"grid ran {len(grid)} of {grid_size} configs"
    assert all(len(accs) == task.epochs for _, accs in grid), "a grid trial lost an evaluation"
    target = max(max(accs) for _, accs in grid)
    grid_cost = sum(len(accs) for _, accs in grid)
    best = [p for p, accs in grid if max(accs) >= target - 1e-9]
    print(f"grid: {grid_size} configs, {grid_cost} trial-epochs, best {METRIC}={target:.3f} "
          f"({len(best)} config(s) reach it)", flush=True)
    out_rows: dict[str, list[dict[str, Any]]] = {"asha+random": [], "asha+optuna": []}
    res = {"task": task_name, "grid": {"configs": grid_size, "epochs": task.epochs, "cost": grid_cost, "target": target,
                    "best_configs": best, "wall_s": round(grid_wall, 1)},
           "searchers": out_rows}
    for seed in range(seeds):
        for name, search in (("asha+random", "random"), ("asha+optuna", "optuna")):
            t1 = time.perf_counter()
            cfg = recipe(task, out, f"{search}-{seed}", search, "asha", BUDGET * grid_size)
            run_sweep(cfg, overwrite=True, search_seed=seed)
            trials = trial_epochs(sweep_dir_of(cfg))
            cost, reached = cost_to_reach(trials, target)
            out_rows[name].append({"seed": seed, "cost": cost, "reached": reached,
                                   "total_epochs": sum(len(a) for _, a in trials),
                                   "wall_s": round(time.perf_counter() - t1, 1)})
            print(f"{name} seed {seed}: {cost} trial-epochs to reach {target:.3f} "
                  f"({'reached' if reached else 'NOT reached'}), spent "
                  f"{out_rows[name][-1]['total_epochs']} in all", flush=True)
            save(res)
    return res


def markdown(res: dict[str, Any]) -> str:
    task = TASKS[res.get("task", "digits")]
    g = res["grid"]
    rows = [["full grid", f"{g['cost']}", "1.00", "-", f"{g['configs']} x {g['epochs']} epochs"]]
    for name, runs in res["searchers"].items():
        if not runs:
            continue
        costs = [r["cost"] for r in runs]
        ratio = [c / g["cost"] for c in costs]
        reached = sum(r["reached"] for r in runs)
        rows.append([name, "{:.1f} ± {:.1f}".format(*mean_std(costs)),
                     f"{statistics.fmean(ratio):.2f} (max {max(ratio):.2f})",
                     f"{reached}/{len(runs)}",
                     "per seed: " + ", ".join(str(c) for c in costs)])
    return (f"# Search efficiency ({task.title}, target {METRIC} = {g['target']:.3f}, the best "
            f"of the full grid)\n\n"
            + markdown_table(["search", "trial-epochs to reach target", "x grid", "reached",
                              "notes"], rows)
            + f"\nGrid: optimizer {{{', '.join(task.optimizers)}}} x lr "
            f"{{{', '.join(map(str, task.lrs))}}}"
            f", {g['epochs']} epochs each; {len(g['best_configs'])} config(s) reach the target. "
            f"Searchers: {BUDGET * g['configs']} trials each, ASHA grace 1 / factor 3, one "
            f"trial at a time; cost counted until the target is first reached (the whole spend "
            f"when it is not). Goal: <= 0.33x grid.\n"
            + (f"\nNote: {res['note']}.\n" if res.get("note") else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="search seeds per searcher")
    p.add_argument("--task", choices=sorted(TASKS), default="digits")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="smallshot-search-") as tmp:
        res = run(args.task, args.seeds, Path(tmp))
    print(save(res).read_text())


if __name__ == "__main__":
    main()

"""Tune overhead per trial on local Ray, fresh processes vs warm runners, side by side.

Two workloads, each run as sweeps of N1 and N2 trials, one trial at a time, once with a fresh
process per trial (``reuse_actors=False``, as before warm runners) and once with warm runners
(``tune.reuse_runners=true``), the four sweeps of a size taking turns so load from other
processes falls on both alike:
  * ``bare``: each trial is a fixed 0.5 s of work in plain Tune with the sweep's settings
    (with_resources, the trial callback, storage in a sweep folder);
  * ``fit``: real smallshot trials (``run_sweep``) training tiny-digits for 2 epochs, against
    the same configs trained by ``fit`` in this process (warm: imports and data cached).
The per-trial overhead is the slope (T(N2) - T(N1)) / (N2 - N1) minus the work per trial, so
the fixed cost of a sweep (Tuner set-up, experiment state, the Ray instance) drops out; that
fixed cost is reported apart. Goal: <= 0.3 s per ``fit`` trial, <= 0.15 s per bare trial.

Where the time of a ``fit`` trial goes comes from the trials' own records: the driver's Tune
callback (trial complete), ``trial.json`` (function entered / left, imports) and each run's
``result.json`` timings (``trainers.timing``: data, model, strategy, train, evaluate, ...).

    python -m benchmarks.tune_overhead              # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, write_results
from trainers.config import RunConfig
from trainers.recipe import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SLEEP_S = 0.5
MODES = {"fresh": False, "warm": True}  # mode -> reuse runners


def sleep_trial(config: dict[str, Any]) -> None:
    from ray import tune

    time.sleep(SLEEP_S)
    tune.report({"val/accuracy": config["x"]})


def sleep_sweep(n: int, out: Path, reuse: bool) -> float:
    from ray import tune

    from cluster.trial import trial_dirname
    from cluster.tune import trial_log

    trainable = tune.with_resources(sleep_trial, {"CPU": 1})
    t0 = time.perf_counter()
    tune.Tuner(trainable, param_space={"x": tune.uniform(0, 1)},
               tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=1,
                                           metric="val/accuracy", mode="max", reuse_actors=reuse,
                                           trial_dirname_creator=trial_dirname),
               run_config=tune.RunConfig(name=f"sleep-{n}-{reuse}", storage_path=str(out),
                                         verbose=0, callbacks=[trial_log("val/accuracy")])).fit()
    return time.perf_counter() - t0


def fit_recipe(out: Path, name: str, n: int, reuse: bool = True) -> RunConfig:
    return load_config(CONFIGS / "tiny-digits.yaml", [
        f"train.output_dir={out}", "train.epochs=2", "train.save_checkpoints=false",
        "tune.space={optim.lr: 'loguniform[1e-3, 1e-2]'}", "tune.scheduler=none",
        f"tune.num_samples={n}", "tune.max_concurrent=1", f"tune.name={name}",
        f"tune.reuse_runners={str(reuse).lower()}", "train.num_threads=1"])


def completions() -> Any:
    """A Tune callback noting when the driver saw each trial complete."""
    from ray.tune import Callback

    class Completions(Callback):
        def __init__(self) -> None:
            self.at: dict[str, float] = {}

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.at[trial.trial_id] = time.time()

    return Completions()


def trial_phases(sweep: Path, completed: dict[str, float]) -> list[dict[str, float]]:
    """Per trial (in the order they ran, the first left out: nothing precedes it), seconds of:
    Tune between the previous trial's completion and this one's entry (process start or
    reset), imports, the trial's own set-up, each phase of fit, and Tune after the trial left."""
    trials = []
    for run in (sweep / "runs").iterdir():
        record = json.loads((run / "trial.json").read_text())
        timings = json.loads((run / "result.json").read_text()).get("timings", {})
        trials.append((record, timings))
    trials.sort(key=lambda t: t[0]["started"])
    out = []
    for (prev, _), (record, timings) in itertools.pairwise(trials):
        inside = record["ended"] - record["started"]
        row = {"runner start / reset": record["started"] - completed[prev["trial_id"]],
               "imports": record.get("imports_s", 0.0)}
        row.update({f"fit: {k}": v for k, v in timings.items()})
        row["trial set-up, records"] = inside - row["imports"] - sum(timings.values())
        row["memory release (gc)"] = record.get("release_s", 0.0)
        row["results to driver"] = (completed[record["trial_id"]] - record["ended"]
                                    - row["memory release (gc)"])
        out.append(row)
    return out


def fit_sweep(n: int, out: Path, reuse: bool) -> tuple[float, list[float], list[dict]]:
    """Wall time of the sweep, the lrs its trials drew (to train them directly), phases."""
    from cluster.tune import run_sweep, sweep_dir_of

    cfg = fit_recipe(out, f"fit-{n}-{reuse}", n, reuse)
    done = completions()
    t0 = time.perf_counter()
    run_sweep(cfg, overwrite=True, callbacks=[done])
    wall = time.perf_counter() - t0
    sweep = sweep_dir_of(cfg)
    lrs = [json.loads((p / "trial.json").read_text())["params"]["optim.lr"]
           for p in (sweep / "runs").iterdir()]
    return wall, lrs, trial_phases(sweep, done.at)


def direct_fits(out: Path, lrs: list[float]) -> list[float]:
    from trainers.loop import fit

    secs = []
    for i, lr in enumerate(lrs):
        cfg = fit_recipe(out, "direct", 1).replace({
            "optim.lr": lr, "train.test": False, "train.progress": False,
            "train.run_name": f"direct-{i}", "tune.space": {}})
        t0 = time.perf_counter()
        fit(cfg)
        secs.append(time.perf_counter() - t0)
    return secs


def mean_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: round(statistics.fmean(r.get(k, 0.0) for r in rows), 4) for k in keys}


def slope(wall: dict[int, float], n1: int, n2: int) -> float:
    return (wall[n2] - wall[n1]) / (n2 - n1)


def run(n1: int, n2: int, out: Path) -> dict[str, Any]:
    from cluster.session import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(None, num_cpus=2)
    ray_init = time.perf_counter() - t0
    bare: dict[str, dict[int, float]] = {m: {} for m in MODES}
    fits: dict[str, dict[int, tuple]] = {m: {} for m in MODES}
    for n in (n1, n2):
        for mode, reuse in MODES.items():
            bare[mode][n] = sleep_sweep(n, out, reuse)
            print(f"bare {mode}: {n} trials {bare[mode][n]:.1f} s", flush=True)
        for mode, reuse in MODES.items():
            fits[mode][n] = fit_sweep(n, out, reuse)
            print(f"fit {mode}: {n} trials {fits[mode][n][0]:.1f} s", flush=True)
    direct_fits(out, fits["warm"][n1][1][:1])  # warm-up: imports, data, first-call allocations
    direct = direct_fits(out, fits["warm"][n2][1])
    work = statistics.fmean(direct)
    res: dict[str, Any] = {"n1": n1, "n2": n2, "ray_init_s": round(ray_init, 2),
                           "load_average": [round(x, 2) for x in os.getloadavg()], "modes": {}}
    for mode in MODES:
        b, f = bare[mode], {n: v[0] for n, v in fits[mode].items()}
        bs, fs = slope(b, n1, n2), slope(f, n1, n2)
        res["modes"][mode] = {
            "bare": {"work_s": SLEEP_S, "wall_s": {str(k): round(v, 2) for k, v in b.items()},
                     "per_trial_s": round(bs, 3), "overhead_s": round(bs - SLEEP_S, 3),
                     "fixed_s": round(b[n1] - n1 * bs, 2)},
            "fit": {"work_s": round(work, 3), "direct_s": [round(s, 3) for s in direct],
                    "wall_s": {str(k): round(v, 2) for k, v in f.items()},
                    "per_trial_s": round(fs, 3), "overhead_s": round(fs - work, 3),
                    "fixed_s": round(f[n1] - n1 * fs, 2),
                    "phases_s": mean_phases(fits[mode][n2][2])}}
    return res


REUSE_HANG = (
    "## Why Tune's `reuse_actors` hung here before (Ray 2.60), and the fix\n\n"
    "`FunctionTrainable.reset_config` waits `TUNE_FUNCTION_THREAD_TIMEOUT_S` (default **2 s**) "
    "for the previous trial's training thread to end, and returns False if it is still alive. "
    "Our trial ended with a full `gc.collect()` of the freed model, in that thread: ~1 s alone, "
    "past 2 s under load. On False, `TuneController._on_trial_reset` errors the *next* trial "
    "(`_AbortTrialExecution`) through `_schedule_trial_stop`, which never calls the searcher's "
    "`on_trial_complete`; with `max_concurrent=1` the ConcurrencyLimiter's one slot stays taken, "
    "so the searcher suggests nothing and the sweep loops forever. Fix (cluster/trial.py): the "
    "trial sets `TUNE_FUNCTION_THREAD_TIMEOUT_S=600` (read at each reset) and `gc.freeze()`s "
    "what outlives a trial, so the release takes milliseconds (`memory release (gc)` above).\n")


def markdown(res: dict[str, Any]) -> str:
    n1, n2 = res["n1"], res["n2"]
    rows = []
    for workload, goal in (("bare", 0.15), ("fit", 0.3)):
        for mode in MODES:
            r = res["modes"][mode][workload]
            ok = "✓" if r["overhead_s"] <= goal else "✗"
            rows.append([workload, mode, f"{r['work_s']:.3f}", f"{r['per_trial_s']:.3f}",
                         f"**{r['overhead_s']:.3f}** (goal ≤ {goal}) {ok}", f"{r['fixed_s']:.1f}",
                         f"{r['wall_s'][str(n1)]:.1f} / {r['wall_s'][str(n2)]:.1f}"])
    fresh, warm = (res["modes"][m]["fit"]["phases_s"] for m in MODES)
    phase_rows = [[k, f"{fresh.get(k, 0.0):.3f}", f"{warm.get(k, 0.0):.3f}"]
                  for k in dict.fromkeys([*fresh, *warm])]
    phase_rows.append(["**sum**", f"{sum(fresh.values()):.3f}", f"{sum(warm.values()):.3f}"])
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    return ("# Tune overhead per trial (local Ray, one trial at a time)\n\n"
            + markdown_table(["workload", "runners", "work per trial (s)",
                              "sweep time per trial (s)", "overhead per trial (s)",
                              "fixed per sweep (s)", f"wall {n1} / {n2} trials (s)"], rows)
            + f"\nPer-trial time is the slope between sweeps of {n1} and {n2} trials; overhead "
            f"= slope - work. `fresh`: one new process per trial (reuse_actors=False, the old "
            f"path); `warm`: `tune.reuse_runners=true` (the default). `fit` work is the same "
            f"configs trained by `trainers.fit` in-process. `ray.init`: "
            f"{res['ray_init_s']:.1f} s, once.\n\n"
            f"## Where a `fit` trial's time goes (mean over the {n2}-trial sweep, seconds)\n\n"
            + markdown_table(["phase", "fresh", "warm"], phase_rows)
            + "\n`runner start / reset`: from the driver seeing the previous trial complete to "
            "this trial's function starting (a new actor process, or Tune's reset of a warm "
            "one); `imports`: torch and smallshot's training code inside the trial; `fit: *`: "
            "`trainers.timing` phases of the run (`report` = blocking in `tune.report`); "
            "`results to driver`: from the trial function returning to the driver's "
            "on_trial_complete.\n\n"
            "The issue's phases map onto these rows: process/actor start and Ray's "
            "bookkeeping between trials = `runner start / reset`; imports = `imports`; model "
            "load = `fit: model`; data loading / tokenisation = `fit: data`; evaluation = "
            "`fit: evaluate`; checkpoint writes = `fit: checkpoints` (the benchmark recipe "
            "saves none, so this is the metrics.jsonl line and tracker); result syncing = `fit: report` + "
            "`results to driver`.\n\n"
            + REUSE_HANG + "\n"
            f"Machine: {res['machine']['cpus']} cores shared with other agents' jobs "
            f"(load average {load} at the end): absolute times are noisy; the ratios, measured "
            f"side by side in one run, are what count.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n1", type=int, default=4)
    p.add_argument("--n2", type=int, default=16)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="smallshot-overhead-") as tmp:
        res = run(args.n1, args.n2, Path(tmp))
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    path = write_results("tune_overhead", res, markdown(res))
    print(path.read_text())


if __name__ == "__main__":
    main()

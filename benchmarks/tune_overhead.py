"""Tune overhead per trial on local Ray: a sweep of N trials vs the same work called directly.

Two workloads, each run as sweeps of N1 and N2 trials, one trial at a time:
  * ``sleep``: each trial is a fixed 0.5 s of work in plain Tune with the sweep's settings
    (with_resources, one process per trial, the trial callback, storage in a sweep folder);
  * ``fit``: real smallshot trials (``run_sweep``) training tiny-digits for 2 epochs, against
    the same configs trained by ``fit`` in this process (warm: imports and data cached).
The per-trial overhead is the slope (T(N2) - T(N1)) / (N2 - N1) minus the work per trial, so
the fixed cost of a sweep (Tuner set-up, experiment state, the Ray instance) drops out; that
fixed cost is reported apart. Goal: <= 0.3 s per trial beyond the trial's own work.

    python -m benchmarks.tune_overhead              # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
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


def sleep_trial(config: dict[str, Any]) -> None:
    from ray import tune

    time.sleep(SLEEP_S)
    tune.report({"val/accuracy": config["x"]})


def sleep_sweep(n: int, out: Path) -> float:
    from ray import tune

    from cluster.trial import trial_dirname
    from cluster.tune import trial_log

    trainable = tune.with_resources(sleep_trial, {"CPU": 1})
    t0 = time.perf_counter()
    tune.Tuner(trainable, param_space={"x": tune.uniform(0, 1)},
               tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=1,
                                           metric="val/accuracy", mode="max", reuse_actors=False,
                                           trial_dirname_creator=trial_dirname),
               run_config=tune.RunConfig(name=f"sleep-{n}", storage_path=str(out), verbose=0,
                                         callbacks=[trial_log("val/accuracy")])).fit()
    return time.perf_counter() - t0


def fit_recipe(out: Path, name: str, n: int) -> RunConfig:
    return load_config(CONFIGS / "tiny-digits.yaml", [
        f"train.output_dir={out}", "train.epochs=2", "train.save_checkpoints=false",
        "tune.space={optim.lr: 'loguniform[1e-3, 1e-2]'}", "tune.scheduler=none",
        f"tune.num_samples={n}", "tune.max_concurrent=1", f"tune.name={name}",
        "train.num_threads=1"])


def fit_sweep(n: int, out: Path) -> tuple[float, list[float]]:
    """Wall time of the sweep, and the lrs its trials drew (to train them directly)."""
    import json

    from cluster.tune import run_sweep, sweep_dir_of

    cfg = fit_recipe(out, f"fit-{n}", n)
    t0 = time.perf_counter()
    run_sweep(cfg, overwrite=True)
    wall = time.perf_counter() - t0
    runs = sweep_dir_of(cfg) / "runs"
    lrs = [json.loads((p / "trial.json").read_text())["params"]["optim.lr"]
           for p in runs.iterdir()]
    return wall, lrs


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


def run(n1: int, n2: int, out: Path) -> dict[str, Any]:
    from cluster.session import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(None, num_cpus=2)
    ray_init = time.perf_counter() - t0
    sleep = {n: sleep_sweep(n, out) for n in (n1, n2)}
    sleep_slope = (sleep[n2] - sleep[n1]) / (n2 - n1)
    print(f"sleep: {n1} trials {sleep[n1]:.1f} s, {n2} trials {sleep[n2]:.1f} s", flush=True)
    fits = {n: fit_sweep(n, out) for n in (n1, n2)}
    direct_fits(out, fits[n1][1][:1])  # warm-up: imports, data, first-call allocations
    direct = direct_fits(out, fits[n2][1])
    fit_slope = (fits[n2][0] - fits[n1][0]) / (n2 - n1)
    work = statistics.fmean(direct)
    print(f"fit: {n1} trials {fits[n1][0]:.1f} s, {n2} trials {fits[n2][0]:.1f} s; direct "
          f"{work:.2f} s per run", flush=True)
    return {
        "n1": n1, "n2": n2, "ray_init_s": round(ray_init, 2),
        "sleep": {"work_s": SLEEP_S, "wall_s": {str(k): round(v, 2) for k, v in sleep.items()},
                  "per_trial_s": round(sleep_slope, 3),
                  "overhead_s": round(sleep_slope - SLEEP_S, 3),
                  "fixed_s": round(sleep[n1] - n1 * sleep_slope, 2)},
        "fit": {"work_s": round(work, 3), "direct_s": [round(s, 3) for s in direct],
                "wall_s": {str(k): round(v[0], 2) for k, v in fits.items()},
                "per_trial_s": round(fit_slope, 3), "overhead_s": round(fit_slope - work, 3),
                "fixed_s": round(fits[n1][0] - n1 * fit_slope, 2)},
    }


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for name in ("sleep", "fit"):
        r = res[name]
        rows.append([name, f"{r['work_s']:.3f}", f"{r['per_trial_s']:.3f}",
                     f"**{r['overhead_s']:.3f}**", f"{r['fixed_s']:.1f}",
                     f"{r['wall_s'][str(res['n1'])]:.1f} / {r['wall_s'][str(res['n2'])]:.1f}"])
    return ("# Tune overhead per trial (local Ray, one trial at a time)\n\n"
            + markdown_table(["workload", "work per trial (s)", "sweep time per trial (s)",
                              "overhead per trial (s)", "fixed per sweep (s)",
                              f"wall {res['n1']} / {res['n2']} trials (s)"], rows)
            + f"\nPer-trial time is the slope between sweeps of {res['n1']} and {res['n2']} "
            f"trials; overhead = slope - work. `fit` work is the same configs trained by "
            f"`trainers.fit` in-process. `ray.init`: {res['ray_init_s']:.1f} s, once. "
            f"Goal: <= 0.3 s per trial.\n")


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

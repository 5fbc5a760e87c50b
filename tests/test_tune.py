"""Tune sweeps: search-space validation, a real ASHA sweep on local Ray, kill + resume."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT

from cluster.space import Conditional, Dist, parse_space
from cluster.tune import check_sweep_data, prepare_sweep_dir, run_sweep, sweep_dir_of
from trainers.errors import ConfigError
from trainers.recipe import load_config

TINY = CONFIGS / "tiny-digits.yaml"


def tiny(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"train.output_dir={tmp_path}", *overrides])


def space_of(tmp_path: Path, space: str, *extra: str):
    """A tiny-digits config whose tune.space is the YAML flow mapping ``space``."""
    return tiny(tmp_path, f"tune.space={space}", *extra)


# --------------------------------------------------------------------------------------------
# Search spaces (no Ray)


def test_space_parses_every_distribution_kind(tmp_path: Path) -> None:
    cfg = space_of(tmp_path, "{optim.name: 'choice[sgd, momentum, adam, adamw]', "
                   "optim.lr: 'loguniform[1e-5, 1e-1]', optim.weight_decay: 'uniform[0, 0.1]', "
                   "model.params.hidden: 'randint[8, 64]', data.shots: 'grid[8, 16]', "
                   "optim.momentum: 'quniform[0.5, 0.95, 0.05]', train.batch_size: "
                   "'lograndint[8, 64]', optim.eps: 'qloguniform[1e-9, 1e-6, 1e-9]'}")
    space = parse_space(cfg)
    assert space.dims["optim.lr"] == Dist("loguniform", (1e-5, 1e-1))  # '1e-5' read as a number
    assert space.dims["data.shots"].kind == "grid" and space.grid_size() == 2
    assert space.grid_size(grid=True) == 8  # choice enumerated too under search=grid
    hidden = space.dims["model.params.hidden"].to_tune()
    # both ends included; 3000 draws miss one of the 57 values with odds ~1e-22 (400: 1 in 20)
    assert {hidden.sample() for _ in range(3000)} == set(range(8, 65))


@pytest.mark.parametrize("space, needle", [
    ("{optim.lrr: 'loguniform[1e-5, 1e-1]'}", "optim.lrr: unknown key"),
    ("{optimizer.lr: 'uniform[0, 1]'}", "optimizer: unknown key"),
    ("{optim.lr: 'lognormal[1e-5, 1e-1]'}",
     "tune.space.optim.lr: unknown distribution 'lognormal'"),
    ("{optim.lr: 'loguniform[0, 1e-1]'}",
     "tune.space.optim.lr: 'loguniform[0, 1e-1]': lower bound 0 must be > 0"),
    ("{optim.lr: 'loguniform[1e-1, 1e-5]'}",
     "tune.space.optim.lr: 'loguniform[1e-1, 1e-5]': lower bound"),
    ("{optim.lr: 'uniform[0.1]'}", "tune.space.optim.lr: uniform takes 2 argument(s)"),
    ("{optim.lr: 'uniform[0, 20]'}",
     "tune.space.optim.lr: value 20 of uniform[0, 20] is not allowed: optim.lr: 20.0 is out"),
    ("{optim.name: 'choice[sgd, adamx]'}",
     "tune.space.optim.name: value 'adamx' of choice[sgd, adamx]"),
    ("{model.params.hidden: 'uniform[8, 64]'}",
     "tune.space.model.params.hidden: value 28.72 of uniform[8, 64] is not allowed: expected int"),
    ("{optim.schedule: 'choice[linear, cosyne]'}", "tune.space.optim.schedule: value 'cosyne'"),
    ("{optim.lr: 0.1}", "tune.space.optim.lr: expected a distribution"),
    ("{optim.lr: 'choice[0.1, 0.1]'}", "listed twice"),
    ("{scaling.num_workers: 'choice[1, 2]'}", "tune.space.scaling.num_workers: this field cannot"),
    ("{data.fold: 'choice[0, 1]'}", "tune.space.data.fold: this field cannot be searched"),
    ("{model.strategy_params.contrastive.loss: 'grid[cosine, supcn]'}",  # not the strategy now
     "value 'supcn' of grid[cosine, supcn] is not allowed: 'supcn' is not allowed (allowed: "
     "cosine, supcon); did you mean 'supcon'?"),
])
def test_invalid_spaces_name_the_field(tmp_path: Path, space: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_space(space_of(tmp_path, space))
    assert needle in str(e.value), str(e.value)


def test_unknown_optimizer_choice_says_which_are_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown optimizer .*allowed: .*adamw"):
        parse_space(space_of(tmp_path, "{optim.name: 'choice[sgd, adamx]'}"))


COND = ("{optim.name: 'choice[sgd, adam]', optim.lr: {by: optim.name, "
        "sgd: 'loguniform[1e-3, 1e-1]', adam: 'loguniform[1e-5, 1e-3]'}}")


@pytest.mark.parametrize("space, needle", [
    ("{optim.lr: {by: optim.name, sgd: 'loguniform[1e-3, 1e-1]'}}", "by='optim.name' must name"),
    ("{optim.name: 'choice[sgd, adam]', optim.lr: {by: optim.name, "
     "sgd: 'loguniform[1e-3, 1e-1]'}}", "no branch for optim.name='adam'"),
    ("{optim.name: 'choice[sgd, adam]', optim.lr: {by: optim.name, "
     "adamw: 'loguniform[1e-3, 1e-1]', default: 'loguniform[1e-4, 1e-2]'}}",
     "tune.space.optim.lr.adamw: 'adamw' is not a value of optim.name"),
    ("{optim.name: 'choice[sgd, adam]', optim.lr: {by: optim.name, "
     "sgd: 'loguniform[1e-3, 50]', default: 'loguniform[1e-4, 1e-2]'}}",
     "tune.space.optim.lr.sgd: value 50 of loguniform[0.001, 50] is not allowed"),
    ("{optim.name: 'uniform[0, 1]', optim.lr: {by: optim.name, default: 'uniform[0, 1]'}}",
     "tune.space.optim.name: value 0 of uniform[0, 1] is not allowed: unknown optimizer"),
])
def test_invalid_conditional_spaces(tmp_path: Path, space: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_space(space_of(tmp_path, space))
    assert needle in str(e.value), str(e.value)


def test_conditional_space_for_random_and_optuna(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    space = parse_space(space_of(tmp_path, COND))
    cond = space.dims["optim.lr"]
    assert isinstance(cond, Conditional) and space.conditional
    ranges = {"sgd": (1e-3, 1e-1), "adam": (1e-5, 1e-3)}
    for name in ("sgd", "adam"):  # what tune.sample_from calls once optim.name is drawn
        lo, hi = ranges[name]
        assert all(lo <= cond.sample({"optim.name": name}) <= hi for _ in range(50))
    # a seeded space repeats its conditional draws; another seed draws others
    samplers = [space.param_space(seed=s)["optim.lr"].func for s in (3, 3, 4)]
    draws = [[f({"optim.name": "sgd"}) for _ in range(3)] for f in samplers]
    assert draws[0] == draws[1] != draws[2] and len(set(draws[0])) == 3
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        values = space(trial)  # define-by-run: each branch its own Optuna parameter
        name = values["optim.name"]
        lo, hi = ranges[name]
        assert lo <= values["optim.lr"] <= hi
        assert f"optim.lr@{name}" in trial.params
        seen.add(name)
        study.tell(trial, 0.5)
    assert seen == {"sgd", "adam"}


def test_sweep_rules_checked_before_ray(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tune.metric='test/accuracy'.*final evaluation"):
        run_sweep(space_of(tmp_path, COND, "tune.metric=test/accuracy"))
    with pytest.raises(ConfigError, match="needs validation data"):
        run_sweep(space_of(tmp_path, COND, "data.val_shots=0"))
    with pytest.raises(ConfigError, match="tune.space: empty"):
        run_sweep(tiny(tmp_path))
    with pytest.raises(ConfigError, match="tune.scheduler: unknown scheduler 'pbt'"):
        run_sweep(space_of(tmp_path, COND, "tune.scheduler=pbt"))


def test_invalid_space_fails_before_any_trial_or_folder(tmp_path: Path, capsys) -> None:
    """Through the CLI: one line naming the field, exit 2, no sweep folder, Ray not started."""
    import ray

    import launch

    assert not ray.is_initialized()
    code = launch.main(["tune", str(TINY), f"train.output_dir={tmp_path}",
                        "tune.space={optim.lr: 'loguniform[1e-5, 1e-1]', "
                        "optim.nam: 'choice[sgd]'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "optim.nam: unknown key" in err and "did you mean 'name'" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists()


def test_data_every_trial_would_refuse_fails_once_before_ray(tmp_path: Path, capsys) -> None:
    """Too few examples for data.shots: one line from the driver, not one error per trial."""
    import ray

    import launch

    code = launch.main(["tune", str(TINY), f"train.output_dir={tmp_path}", "data.shots=150",
                        "tune.space={optim.lr: 'grid[1e-3, 1e-2]'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "data.shots=150: class 0" in err, err
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists()
    # a searched data field is left to the trials (each may draw differently)
    cfg = space_of(tmp_path, "{data.shots: 'grid[5, 150]'}")
    check_sweep_data(cfg, parse_space(cfg))


# --------------------------------------------------------------------------------------------
# Kill and resume (its own Ray, in subprocesses)


# Warm runners finish a tiny trial in a tenth of a second: 100 shots in batches of 4 and enough
# trials that the sweep is still running when Tune's snapshot (every KILL_SNAPSHOT_S here)
# first shows one finished
KILL_TRIALS, KILL_SNAPSHOT_S = 8, "1"
SECOND_LONG_TRIAL = ["data.shots=100", "train.batch_size=4"]


def tune_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "launch.py", "tune", str(TINY), f"train.output_dir={out}",
            "tune.space={optim.lr: 'loguniform[1e-3, 1e-2]'}", f"tune.num_samples={KILL_TRIALS}",
            "tune.scheduler=none", "tune.max_concurrent=1", "train.epochs=3",
            *SECOND_LONG_TRIAL, "train.save_checkpoints=false", "--no-report", *extra]


def trial_states(sweep: Path) -> dict[str, str]:
    """Trial id -> status in Tune's newest experiment state (what a resume starts from)."""
    files = sorted(glob.glob(str(sweep / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        data = json.loads(Path(files[-1]).read_text())
    except (json.JSONDecodeError, OSError):  # being rewritten
        return {}
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def start_sweep_until_a_trial_finishes(cmd: list[str], sweep: Path, env: dict[str, str],
                                      log: Path | None = None,
                                      timeout_s: float = 150.0) -> subprocess.Popen:
    """Start a sweep driver in its own session; return it, still running, once a trial has
    finished. Fails the test (and kills the driver's session) when that does not happen."""
    out = log.open("w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if "TERMINATED" in trial_states(sweep).values():
            return proc
        time.sleep(0.2)
    ended = proc.poll() is not None
    if not ended:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    detail = f":\n{log.read_text()[-2000:]}" if log else ""
    pytest.fail(("the sweep ended before it could be killed" if ended
                 else "no trial finished in time") + detail)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "TUNE_GLOBAL_CHECKPOINT_S": KILL_SNAPSHOT_S}
    sweep = tmp_path / "sweeps" / "tiny-digits"
    proc = start_sweep_until_a_trial_finishes(tune_cmd(tmp_path), sweep, env)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-sweep
    proc.wait()
    before = trial_states(sweep)
    finished = {t for t, s in before.items() if s == "TERMINATED"}
    assert len(finished) < KILL_TRIALS, before
    started = {t: json.loads((sweep / "runs" / t / "trial.json").read_text())["started"]
               for t in finished}
    reports = {t: (sweep / t / "result.json").read_text() for t in finished}

    recipe = tune_cmd(tmp_path)[3:-1]
    with pytest.raises(ConfigError, match="already exists: pass --resume"):
        prepare_sweep_dir(load_config(recipe[0], recipe[1:]), resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="differs from the sweep .* in train.epochs"):
        prepare_sweep_dir(load_config(recipe[0], [*recipe[1:], "train.epochs=4"]), resume=True,
                          overwrite=False)

    resumed = subprocess.run(tune_cmd(tmp_path, "--resume"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    after = trial_states(sweep)
    assert len(after) == KILL_TRIALS and set(after.values()) == {"TERMINATED"}, after
    for t in finished:  # not rerun: same start, same reports
        record = json.loads((sweep / "runs" / t / "trial.json").read_text())
        assert record["started"] == started[t]
        assert (sweep / t / "result.json").read_text() == reports[t]
    for t in after:  # every trial has its full results: 3 epochs, each reported once
        rows = (sweep / t / "result.json").read_text().splitlines()
        assert json.loads(rows[-1])["training_iteration"] == 3


# --------------------------------------------------------------------------------------------
# A real sweep on local Ray


@pytest.mark.ray
def test_asha_sweep_of_eight_trials_stops_bad_ones_and_never_reads_test(tmp_path: Path,
                                                                        local_ray) -> None:
    cfg = tiny(tmp_path, "tune.space={optim.name: 'choice[sgd, adam]', optim.lr: {by: optim.name,"
               " sgd: 'loguniform[1e-4, 1]', default: 'loguniform[1e-6, 1e-1]'}}",
               "tune.search=optuna", "tune.num_samples=8", "tune.scheduler=asha",
               "tune.grace_period=1", "tune.reduction_factor=3", "train.epochs=4",
               "train.save_checkpoints=false", "tune.name=asha")
    outcome = run_sweep(cfg)
    assert outcome.trials == 8 and outcome.errors == 0
    assert "resource plan: 2 trial(s) at once" in outcome.plan_table
    sweep = sweep_dir_of(cfg)
    assert sweep == tmp_path / "sweeps" / "asha"
    iterations = {}
    for trial in (p for p in sweep.iterdir() if (p / "result.json").is_file()):
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert not [k for r in rows for k in r if k.startswith("test/")]  # selection saw no test
        iterations[trial.name] = rows[-1]["training_iteration"]
        run_cfg = load_config(sweep / "runs" / trial.name / "config.yaml", check_paths=False)
        assert run_cfg.train.test is False and run_cfg.train.monitor == "val/accuracy"
        lo, hi = (1e-4, 1) if run_cfg.optim.name == "sgd" else (1e-6, 1e-1)
        assert lo <= run_cfg.optim.lr <= hi
    assert len(iterations) == 8
    assert max(iterations.values()) == 4  # 4 epochs, each reported once
    assert min(iterations.values()) < 4, f"ASHA stopped nothing: {iterations}"

    from cluster.report import write_report

    rep = write_report(sweep, final=False)
    assert len(rep.rows) == 8 and rep.rows[0].score is not None
    assert any(r.iterations < 4 for r in rep.rows)
    assert (sweep / "leaderboard.csv").read_text().count("\n") == 9
    assert {p.name for p in rep.plots} == {"metric_vs_optim_lr.png", "learning_curves.png",
                                           "rung_survival.png"}
    assert math.isclose(rep.rows[0].score, max(r.score for r in rep.rows if r.score is not None))


@pytest.mark.ray
def test_self_training_is_chosen_by_cv_on_the_draw(tmp_path: Path, local_ray) -> None:
    cfg = tiny(tmp_path, "data.unlabeled=rest", "data.val_shots=0", "data.folds=2",
               "model.strategy=lp-ft", "selftrain.per_class=5", "train.epochs=1",
               "tune.space={selftrain.rounds: 'grid[0, 2]'}", "tune.search=grid",
               "tune.scheduler=none", "tune.num_samples=1", "tune.metric=val/accuracy",
               "train.save_checkpoints=false", "tune.name=selftrain")
    outcome = run_sweep(cfg)
    assert outcome.trials == 2 and outcome.errors == 0
    runs = sweep_dir_of(cfg) / "runs"
    records = sorted(p.parent.name for p in runs.glob("*/fold-*/pseudo_labels.json"))
    assert records == ["fold-0", "fold-1"]  # the rounds=2 trial self-trained on both folds
    # the two trials differ only after the probe: each fold's probe was fitted once, then shared
    timings = [json.loads(p.read_text())["timings"] for p in runs.glob("*/fold-*/result.json")]
    assert len(timings) == 4 and sum("prepared" in t for t in timings) == 2
    assert not (sweep_dir_of(cfg) / "prepared").exists()  # removed with the sweep's end


# --------------------------------------------------------------------------------------------
# Shared epochs: a k-fold grid's train.epochs axis from one run per fold


SHARED = ["data.folds=2", "data.val_shots=0", "data.shots=8", "train.save_checkpoints=false",
          "tune.space={model.strategy: 'grid[lp-ft, full]', train.epochs: 'grid[0, 1, 3]'}",
          "tune.search=grid", "tune.scheduler=none", "tune.num_samples=1", "tune.final_seeds=0"]


@pytest.mark.parametrize("extra, reason", [
    (["optim.schedule=linear"], "optim.schedule"),
    (["optim.warmup=0.1"], "optim.warmup"),
    (["train.patience=2"], "train.patience"),
    (["train.eval_every=3"], "train.eval_every"),
    (["tune.space={train.epochs: 'grid[0, 2]', optim.schedule: 'grid[constant, cosine]'}"],
     "optim.schedule"),
    (["tune.search=random", "tune.space={train.epochs: 'choice[0, 2]'}"], "grid[...]"),
])
def test_epochs_are_not_shared_where_the_first_epochs_depend_on_the_total(
        tmp_path: Path, extra: list[str], reason: str) -> None:
    from cluster.shared_epochs import shared_counts

    cfg = tiny(tmp_path, *SHARED, *extra)
    counts, why = shared_counts(cfg, parse_space(cfg))
    assert counts is None and reason in why and "a trial per value" in why
    for off in (["tune.share_epochs=false"], ["data.folds=0", "data.val_shots=5"]):
        cfg = tiny(tmp_path, *SHARED, *off)  # asked not to, or no folds: silently per value
        assert shared_counts(cfg, parse_space(cfg)) == (None, "")
    cfg = tiny(tmp_path, *SHARED)
    assert shared_counts(cfg, parse_space(cfg)) == ((0, 1, 3), "")


@pytest.mark.ray
def test_shared_epochs_score_every_grid_point_as_its_own_trial_would(tmp_path: Path,
                                                                     local_ray) -> None:
    """2 trials instead of 6, and the same k-fold mean and std for each of the 6 points (the
    run of 3 epochs passes through where the runs of 0 and 1 end), so the same choice."""
    from cluster.report import collect_trials, pick_best

    prefer = "tune.prefer={model.strategy: full, train.epochs: 3}"
    shared = tiny(tmp_path, *SHARED, prefer, "tune.name=shared")
    apart = tiny(tmp_path, *SHARED, prefer, "tune.name=apart", "tune.share_epochs=false")
    assert run_sweep(shared).trials == 2 and run_sweep(apart).trials == 6
    rows = {s.tune.name: collect_trials(sweep_dir_of(s), s) for s in (shared, apart)}

    def scores(name: str) -> dict[tuple, tuple]:
        return {(r.params["model.strategy"], r.params["train.epochs"]): (r.score, r.std)
                for r in rows[name]}

    assert len(rows["shared"]) == 6 and rows["shared"][0].trial_id.count("@epochs=") == 1
    assert scores("shared").keys() == scores("apart").keys()
    for point, (score, std) in scores("apart").items():
        assert scores("shared")[point] == pytest.approx((score, std), abs=1e-9), point
    assert len({s for s, _ in scores("apart").values()}) > 1  # the points do differ
    assert [r.params for r in rows["shared"]] == [r.params for r in rows["apart"]]  # ties too
    assert pick_best(rows["shared"], shared)[0].params == pick_best(rows["apart"], apart)[0].params

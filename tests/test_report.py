"""Sweep reports on real sweeps: failed trials listed with their error, k-fold scores, best
export, and the test split read by the final evaluation only."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.report import final_evaluation, summary_text, write_report
from cluster.tune import run_sweep, sweep_dir_of
from trainers.errors import ConfigError, DataError
from trainers.recipe import load_config

pytestmark = pytest.mark.ray

PER_CLASS = {"train": 20, "test": 10}


def make_images(root: Path) -> Path:
    """8x8 grey images: class 'top' is bright above, 'bottom' below; test holds a bad file."""
    rng = np.random.default_rng(0)
    for split, n in PER_CLASS.items():
        for label, rows in (("top", slice(0, 4)), ("bottom", slice(4, 8))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (8, 8))
                img[rows] += 150
                Image.fromarray(img.astype(np.uint8), "L").save(folder / f"{i}.png")
    (root / "test" / "top" / "bad.png").write_bytes(b"not a png at all")
    return root / "test" / "top" / "bad.png"


def recipe(tmp_path: Path, data_root: Path, *overrides: str):
    return load_config(None, [
        "name=shapes", "data.format=image_folder", f"data.root={data_root}", "data.channels=1",
        "data.mean=[0.5]", "data.std=[0.25]", "model.name=mlp:64", "model.params.hidden=16",
        "optim.name=adam", "optim.warmup=0.0", "optim.schedule=constant", "train.epochs=3",
        "train.batch_size=8", "train.progress=false", f"train.output_dir={tmp_path / 'out'}",
        "tune.scheduler=none", "tune.max_failures=0", *overrides])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return root, make_images(root)


def results(sweep: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in (p / "result.json").read_text().splitlines()]
            for p in sweep.iterdir() if (p / "result.json").is_file()]


def test_report_lists_failures_exports_best_and_tests_only_at_the_end(tmp_path: Path, data_root,
                                                                     local_ray, capsys) -> None:
    root, bad = data_root
    cfg = recipe(tmp_path, root, "data.shots=6", "data.val_shots=4", "tune.num_samples=2",
                 "tune.final_seeds=2", "tune.search=random",
                 "tune.space={data.shots: 'grid[6, 500]', optim.name: 'choice[sgd, adam]', "
                 "optim.lr: {by: optim.name, sgd: 'loguniform[3e-2, 3e-1]', "
                 "adam: 'loguniform[3e-3, 3e-2]'}}")
    outcome = run_sweep(cfg)  # the test split holds an unreadable file: trials never open it
    assert (outcome.trials, outcome.errors) == (4, 2)
    sweep = sweep_dir_of(cfg)
    assert all(not k.startswith("test/") for rows in results(sweep) for r in rows for k in r)

    rep = write_report(sweep, final=False)
    for r in rep.rows:  # the conditional LR came from its optimizer's branch
        lo, hi = (3e-2, 3e-1) if r.params["optim.name"] == "sgd" else (3e-3, 3e-2)
        assert lo <= r.params["optim.lr"] <= hi, r.params
    assert [r.status for r in rep.rows] == ["TERMINATED", "TERMINATED", "ERROR", "ERROR"]
    assert all(r.params["data.shots"] == 500 and "data.shots=500" in r.error
               for r in rep.rows[2:]), [r.error for r in rep.rows]
    assert all(r.iterations == 3 and r.gpu_hours == 0.0 and r.time_s > 0 for r in rep.rows[:2])
    assert rep.rows[0].score >= rep.rows[1].score
    with (sweep / "leaderboard.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [row["status"] for row in table] == ["TERMINATED", "TERMINATED", "ERROR", "ERROR"]
    assert "data.shots=500" in table[3]["error"]
    md = (sweep / "report.md").read_text()
    assert "| ERROR |" in md and "data.shots=500" in md and "final test: not run" in md

    best = load_config(sweep / "best" / "config.yaml")  # a ready recipe: test split back on
    assert best.train.test and best.tune.space == {} and best.data.shots == 6
    assert best.optim.lr == pytest.approx(rep.rows[0].params["optim.lr"])
    state = torch.load(sweep / "best" / "model.pt", weights_only=True)
    assert any(v.shape[-1] == 64 for v in state.values())

    with pytest.raises(DataError, match="bad.png"):  # the test split is read here, only here
        final_evaluation(rep, seeds=1)
    bad.unlink()
    rep = write_report(sweep, final=True)
    acc = rep.final["test"]["test/accuracy"]
    per_seed = [m["test/accuracy"] for m in rep.final["per_seed"]]
    assert len(per_seed) == 2 and acc["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert acc["std"] == pytest.approx(statistics.stdev(per_seed))
    assert "test/accuracy" in (sweep / "report.md").read_text()
    text = summary_text(rep, top=2)
    ranks = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert ranks[1:] == ["1", "2"]  # the header, then the top 2 only
    assert "test/accuracy" in text and "±" in text

    import launch

    capsys.readouterr()
    assert launch.main(["report", str(sweep), "--top", "3"]) == 0  # cached final: no training
    printed = capsys.readouterr().out
    assert "| 3 | " in printed and "final evaluation:" not in printed


def test_folds_side_by_side_score_exactly_what_they_score_one_after_another(
        tmp_path: Path, data_root, local_ray) -> None:
    """One trial on 2 CPUs with half a CPU per fold: the planner gives it its 3 folds at once,
    one in the trial process and two as Ray tasks in its placement group; they overlap in
    time and report what the trial process scores training them in turn."""
    root, _ = data_root
    common = ["data.shots=6", "data.folds=3", "data.val_shots=0", "tune.num_samples=1",
              "tune.space={optim.lr: 'grid[5e-2]'}", "train.save_checkpoints=false",
              "scaling.cpus_per_worker=0.5", "train.epochs=800"]  # ~1 s a fold
    ran = {}
    for mode, at_once in (("side", 0), ("turns", 1)):
        cfg = recipe(tmp_path, root, *common, f"tune.parallel_folds={at_once}",
                     f"tune.name={mode}")
        outcome = run_sweep(cfg)
        assert (outcome.trials, outcome.errors) == (1, 0)
        sweep = sweep_dir_of(cfg)
        [rows] = results(sweep)
        [trial] = [json.loads((p / "trial.json").read_text()) for p in (sweep / "runs").iterdir()]
        ran[mode] = ([r["val/accuracy_fold"] for r in rows], trial)
        assert [r["fold"] for r in rows] == [1, 2, 3]
    (side, trial), (turns, alone) = ran["side"], ran["turns"]
    assert side == turns
    assert (trial["folds_at_once"], alone["folds_at_once"]) == (3, 1)
    assert {f["pid"] for f in alone["folds"]} == {alone["pid"]}
    pids = [f["pid"] for f in trial["folds"]]
    assert pids[0] == trial["pid"] and len(set(pids)) == 3
    tasks = trial["folds"][1:]  # started together (the trial's own fold may end first: its
    assert max(f["started"] for f in tasks) < min(f["ended"] for f in tasks)  # process is warm)


def test_kfold_trials_report_the_fold_mean_and_std(tmp_path: Path, data_root, local_ray) -> None:
    root, _ = data_root
    cfg = recipe(tmp_path, root, "data.shots=6", "data.folds=3", "data.val_shots=0",
                 "tune.num_samples=1", "tune.space={optim.lr: 'grid[1e-2, 5e-2]'}",
                 "train.save_checkpoints=false")
    outcome = run_sweep(cfg)
    assert (outcome.trials, outcome.errors) == (2, 0)
    sweep = sweep_dir_of(cfg)
    for rows in results(sweep):
        assert [r["fold"] for r in rows] == [1, 2, 3]  # one report per fold: ASHA's iterations
        folds = [r["val/accuracy_fold"] for r in rows]
        assert rows[-1]["val/accuracy"] == pytest.approx(statistics.fmean(folds))
        assert rows[-1]["val/accuracy_std"] == pytest.approx(statistics.stdev(folds))
    for trial in (sweep / "runs").iterdir():
        assert sorted(p.name for p in trial.iterdir() if p.is_dir()) == ["fold-0", "fold-1",
                                                                          "fold-2"]
    rep = write_report(sweep, final=False)
    assert all(r.iterations == 3 and r.std is not None for r in rep.rows)
    assert " ± " in (sweep / "report.md").read_text()
    assert not (sweep / "best" / "model.pt").exists()  # k models, no single checkpoint


def test_the_final_test_is_checked_against_the_cv_estimate(tmp_path: Path, local_ray) -> None:
    root = tmp_path / "shapes"
    make_images(root).unlink()  # the unreadable test image: this test reads the test split
    cfg = recipe(tmp_path, root, "data.shots=6", "data.folds=3", "data.val_shots=0",
                 "tune.num_samples=1", "tune.space={optim.lr: 'grid[5e-2]'}",
                 "train.save_checkpoints=false", "tune.final_seeds=1")
    run_sweep(cfg)
    rep = write_report(sweep_dir_of(cfg), final=True)
    check, [best] = rep.final["cv_check"], rep.rows
    classes = len(json.loads((rep.sweep_dir / "final" / "seed-0" / "labels.json").read_text())
                  ["classes"])
    assert (check["seed"], check["folds"], check["n_val"]) == (0, 3, 6 * classes)
    assert check["cv"] == pytest.approx(best.score)
    assert check["test"] == pytest.approx(rep.final["per_seed"][0]["test/accuracy"])
    by_hand = 2 * (best.std ** 2 / 3 + best.score * (1 - best.score) / (6 * classes)) ** 0.5
    assert check["tolerance"] == pytest.approx(by_hand)
    assert "CV check (few-shot seed 0" in (rep.sweep_dir / "report.md").read_text()


def test_cv_check_verdicts() -> None:
    from cluster.report import cv_check, cv_check_text

    # 2 folds 0.1 apart, 16 validated examples: 2 * sqrt(0.01 / 2 + 0.8 * 0.2 / 16) = 0.245
    holds = cv_check(0.8, 0.1, 2, 0.7, n_val=16)
    assert holds["tolerance"] == pytest.approx(0.2449, abs=1e-4) and holds["verdict"] == "holds"
    below = cv_check(0.83, 0.02, 2, 0.55, n_val=16)
    assert below["verdict"] == "below" and below["gap"] == pytest.approx(-0.28)
    assert "did not hold" in cv_check_text(below, "test/accuracy")
    assert cv_check(0.5, 0.0, 2, 0.9, n_val=16)["verdict"] == "above"
    assert cv_check(1.2, 0.2, 2, 1.0, mode="min")["verdict"] == "holds"  # a loss: spread only
    assert cv_check(1.2, 0.0, 2, 1.0, mode="min")["gap"] == pytest.approx(0.2)  # lower: better


def test_the_preferred_point_stays_best_unless_beaten_beyond_the_noise(tmp_path: Path) -> None:
    from cluster.report import TrialRow, pick_best

    cfg = load_config(None, ["data.format=digits", "data.folds=2", "data.val_shots=0",
                             f"train.output_dir={tmp_path}",
                             "tune.space={optim.name: 'grid[sgd, adam]'}",
                             "tune.prefer={optim.name: sgd}"])

    def row(tid: str, name: str, score: float, std: float) -> TrialRow:
        return TrialRow(tid, "TERMINATED", {"optim.name": name}, score, std, 2, 1.0, 0.0)

    # adam leads by 0.05; the standard error of the difference is sqrt(0.1^2 + 0.1^2) / sqrt(2)
    rows = [row("a", "adam", 0.65, 0.1), row("b", "sgd", 0.60, 0.1)]
    best, why = pick_best(rows, cfg)
    assert best.trial_id == "b" and why.startswith("tune.prefer")
    rows = [row("a", "adam", 0.90, 0.1), row("b", "sgd", 0.60, 0.1)]
    assert pick_best(rows, cfg)[0].trial_id == "a"  # 0.30 > 0.1: a clear win
    assert pick_best(rows, cfg.replace({"tune.prefer_margin": 0.5}))[0].trial_id == "b"
    assert pick_best(rows, cfg.replace({"tune.prefer": {}}))[0].trial_id == "a"
    with pytest.raises(ConfigError, match=r"tune.prefer.optim.lr: not a field of tune.space"):
        cfg.replace({"tune.prefer": {"optim.lr": 0.1}})


def test_a_soup_final_averages_the_best_trials_fold_preparations(tmp_path: Path, local_ray,
                                                                 capsys) -> None:
    root = tmp_path / "shapes"
    make_images(root).unlink()
    cfg = recipe(tmp_path, root, "data.shots=6", "data.folds=3", "data.val_shots=0",
                 "tune.num_samples=1", "tune.space={train.epochs: 'grid[0, 1]'}",
                 "model.strategy=lp-ft", "tune.refit=soup", "train.save_checkpoints=false",
                 "tune.final_seeds=1")
    run_sweep(cfg)
    sweep = sweep_dir_of(cfg)
    # kept for the final run: one preparation per fold, which both trials shared
    assert len(list((sweep / "prepared").glob("*.pt"))) == 3
    capsys.readouterr()
    rep = write_report(sweep, final=True)
    assert ("model.soup_folds=3: the mean of 3 fold preparations (3 reused"
            in capsys.readouterr().out)
    assert 0.0 <= rep.final["per_seed"][0]["test/accuracy"] <= 1.0
    assert rep.final["cv_check"]["folds"] == 3

"""benchmarks/fewshot_text.py: no test-set leakage in selection, the quick run, the cell cache."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import need_shared

from benchmarks import fewshot_text as bench
from trainers.errors import DataError
from trainers.loop import fit
from trainers.recipe import load_config

TINY = ["--max-test", "24", "--max-length", "16", "--folds", "2"]


def test_selection_never_reads_the_test_split(tmp_path, local_ray):
    src = need_shared("data", "text", "sst2")
    ds = tmp_path / "sst2-broken-test"
    ds.mkdir()
    shutil.copy(src / "train.tsv", ds / "train.tsv")
    # a test split that cannot be parsed: anything that reads it fails loudly
    (ds / "test.tsv").write_text("label\tlabel_text\ttext\nnot-a-label\tx\tbroken row\n")
    # self-training too: its pool is the train split's undrawn rest
    cfg = load_config(bench.RECIPE, [f"data.root={ds}", "data.shots=4", "data.max_length=16",
                                     "model.strategy_params.contrastive.iterations=1",
                                     "data.unlabeled=rest", "data.max_unlabeled=40",
                                     "selftrain.per_class=4", "train.epochs=1",
                                     "tune.space={model.strategy: 'grid[lp-ft, contrastive]', "
                                     "selftrain.rounds: 'grid[0, 1]'}", "tune.prefer={}",
                                     f"train.output_dir={tmp_path / 'runs'}"])
    # the Ray Tune sweep trains every grid point on both folds of the 8 few-shot examples
    selection, _, _ = bench.select_by_sweep(cfg, folds=2, metric="accuracy",
                                            workdir=tmp_path / "sel")
    assert len(selection["trials"]) == 4
    assert all(t["status"] == "TERMINATED" and 0.0 <= t["cv"] <= 1.0
               for t in selection["trials"])
    assert selection["params"] in [t["params"] for t in selection["trials"]]
    assert selection["cv_score"] == max(t["cv"] for t in selection["trials"])
    with pytest.raises(DataError, match="test.tsv line 2: label 'not-a-label'"):
        fit(cfg.replace(selection["params"]))


@pytest.mark.slow
def test_quick_run_of_our_methods_caches_cells(tmp_path, local_ray):
    need_shared("data", "text", "sst2")
    args = ["--quick", *TINY, "--results-dir", str(tmp_path), "--methods", "smallshot", "full-ft",
            "--smallshot-overrides", "model.strategy_params.contrastive.iterations=1",
            "tune.space={model.strategy: 'grid[lp-ft]', train.epochs: 'grid[0, 2]'}",
            "tune.prefer={}", "--baseline-overrides", "train.epochs=1"]
    payload = bench.main(args)
    cells = {c["method"]: c for c in payload["cells"]}
    assert set(cells) == {"smallshot", "full-ft"}
    # the same K-shot draw for every method, saved as source line ids (8 per class)
    assert cells["smallshot"]["train_lines"] == cells["full-ft"]["train_lines"]
    assert len(cells["smallshot"]["train_lines"]) == 16
    assert cells["smallshot"]["selection"]["params"]["train.epochs"] in (0, 2)
    # where the draw's time went: the sweep, the final run, each trial's folds
    phases = cells["smallshot"]["phases"]
    assert phases["sweep_s"] > 0 and phases["final_s"] > 0
    assert [t["params"]["model.strategy"] for t in phases["trials"]] == ["lp-ft"]
    assert all(0 <= f[1] <= f[2] for t in phases["trials"] for f in t["folds"])
    for c in cells.values():
        assert 0.0 <= c["value"] <= 1.0
    assert (tmp_path / "fewshot_text_quick.png").stat().st_size > 1000
    assert json.loads((tmp_path / "fewshot_text_quick.json").read_text())["summary"]
    # a rerun takes every cell from the cache
    cached = sorted((tmp_path / "fewshot_text_cells").glob("*.json"))
    assert len(cached) == 2
    stamp = [p.stat().st_mtime_ns for p in cached]
    assert bench.main(args)["cells"] == payload["cells"]
    assert [p.stat().st_mtime_ns for p in cached] == stamp


@pytest.mark.slow
def test_quick_run_of_setfit(tmp_path):
    need_shared("data", "text", "sst2")
    if not bench.setfit_available():
        pytest.skip("setfit is not installed (pip install -r requirements-bench.txt)")
    payload = bench.main(["--quick", *TINY, "--results-dir", str(tmp_path),
                          "--methods", "setfit"])
    (cell,) = payload["cells"]
    assert cell["method"] == "setfit" and 0.0 <= cell["value"] <= 1.0
    assert len(cell["train_lines"]) == 16


def test_phase_means_average_what_the_cells_recorded():
    def cell(seed, start, sweep):
        trials = [{"params": {}, "started": start, "folds": [[1, start + 2, 9], [2, start + 3, 9]]}]
        return {"method": "smallshot", "shots": 8, "seed": seed, "seconds": sweep + 5,
                "phases": {"sweep_s": sweep, "final_s": 5.0, "trials": trials}}
    rows = [cell(0, 1.0, 10.0), cell(1, 2.0, 12.0), {"method": "setfit", "shots": 8}]
    assert bench.phase_means(rows) == {("smallshot", 8): {
        "draws": 2, "trial_start": 1.5, "fold_start": 3.5, "sweep_s": 11.0, "final_s": 5.0,
        "seconds": 16.0}}


def test_paired_differences_and_selection_counts():
    rows = [{"dataset": "cr", "shots": 8, "seed": s, "method": m, "value": v,
             **({"selection": {"params": {"model.strategy": p}}} if m == "smallshot" else {})}
            for s, (a, b, p) in enumerate([(0.7, 0.6, "lp-ft"), (0.5, 0.6, "lp-ft"),
                                           (0.9, 0.6, "contrastive")])
            for m, v in (("smallshot", a), ("setfit", b))]
    rows.append({"dataset": "cr", "shots": 8, "seed": 3, "method": "smallshot", "value": 1.0,
                 "selection": {"params": {"model.strategy": "lp-ft"}}})  # setfit lacks seed 3
    d = bench.paired_differences(rows, ["smallshot", "setfit"], "setfit")["cr/N=8"]["smallshot"]
    assert (d["n"], d["wins"]) == (3, 2) and d["mean"] == pytest.approx(0.1)
    picks = bench.selection_counts(rows)
    assert picks == {("smallshot", "cr", 8): [("strategy=lp-ft", 3), ("strategy=contrastive", 1)]}


def test_goal_check_counts_datasets_ahead_margins_and_time_on_paired_draws():
    rows = [{"dataset": ds, "shots": 8, "seed": s, "method": m, "value": v, "seconds": t}
            for ds, ours in (("cr", (0.8, 0.7)), ("mr", (0.55, 0.6)))
            for s, mine in enumerate(ours)
            for m, v, t in (("smallshot", mine, 20.0), ("setfit", 0.6, 40.0))]
    rows.append({"dataset": "cr", "shots": 8, "seed": 2, "method": "smallshot", "value": 0.0,
                 "seconds": 500.0})  # no setfit cell: counts nowhere
    c = bench.goal_checks(rows, ["smallshot", "setfit"])[("smallshot", 8)]
    assert (c["ahead"], c["datasets"]) == (1, 2)  # cr +0.15, mr -0.025
    assert c["mean_margin"] == pytest.approx(0.0625) and c["min_margin"] == pytest.approx(-0.025)
    assert (c["seconds"], c["baseline_seconds"]) == (20.0, 40.0)
    assert (c["no_slower"], c["timed_datasets"]) == (2, 2)
    assert "| smallshot | 8 | 1/2 | +6.3 | -2.5 | 20 (40) | 2/2 | no |" in bench.goal_table(
        {("smallshot", 8): c})
    c.update(ahead=2, min_margin=0.01)
    assert bench.goal_table({("smallshot", 8): c}).rstrip().endswith("| yes |")


def test_goal_check_counts_datasets_where_one_slow_dataset_does_not_carry_the_mean():
    # mr is slower than setfit on its own draws; cr's long setfit runs pull the mean under
    rows = [{"dataset": ds, "shots": 8, "seed": s, "method": m, "value": 0.7, "seconds": t}
            for ds, ours, theirs in (("cr", 20.0, 60.0), ("mr", 15.0, 10.0))
            for s in range(2) for m, t in (("smallshot", ours), ("setfit", theirs))]
    c = bench.goal_checks(rows, ["smallshot", "setfit"])[("smallshot", 8)]
    assert c["seconds"] < c["baseline_seconds"]
    assert (c["no_slower"], c["timed_datasets"]) == (1, 2)


def test_cv_checks_compare_each_final_run_with_its_chosen_trial():
    def row(seed, value, chosen):
        trials = [{"params": {"model.strategy": "lp-ft"}, "cv": 0.8, "cv_std": 0.1},
                  {"params": {"model.strategy": "contrastive"}, "cv": 0.7, "cv_std": 0.0}]
        return {"dataset": "cr", "shots": 8, "seed": seed, "method": "smallshot",
                "value": value, "train_lines": ["x"] * 16,
                "selection": {"params": {"model.strategy": chosen}, "folds": 2,
                              "trials": trials}}

    # lp-ft: 0.8 ± 2 sqrt(0.01/2 + 0.16/16) = ± 0.245; contrastive: 0.7 ± 2 sqrt(0.21/16)
    rows = [row(0, 0.75, "lp-ft"), row(1, 0.5, "lp-ft"), row(2, 0.95, "contrastive")]
    (key, c), = bench.cv_checks(rows).items()
    assert key == ("smallshot", "cr", 8)
    assert (c["holds"], c["below"], c["above"]) == (1, 1, 1)
    assert c["gaps"] == pytest.approx([-0.05, -0.3, 0.25])


def test_cached_cells_keep_meaning_what_they_measured(monkeypatch):
    from trainers.strategies import strategy_params

    # the ablations pin the pair stage they ran with, whatever the recipe's defaults are now
    cfg = load_config(bench.RECIPE, bench.ABLATIONS["contrastive-probe"])
    assert strategy_params(cfg) == {"iterations": 10, "lr": 2e-5, "batch_size": 8,
                                    "freeze_embeddings": False, "dropout": True,
                                    "schedule": "constant", "warmup": 0.0,
                                    "sampling": "anchored", "templates": 0}
    assert cfg.model.soup_topup == 0 and cfg.train.precision == "fp32"
    # the methods that follow the recipe cache under its generation (from the second on)
    monkeypatch.setattr(bench, "RECIPE_GENERATION", 1)
    assert bench.Cell("cr", 8, 0, "smallshot", 0).key == "cr-n8-s0-tfull-smallshot"
    monkeypatch.setattr(bench, "RECIPE_GENERATION", 2)
    assert bench.Cell("cr", 8, 0, "smallshot", 0).key == "cr-n8-s0-tfull-smallshot-g2"
    assert bench.Cell("cr", 8, 0, "smallshot-retrain", 0).key == (
        "cr-n8-s0-tfull-smallshot-retrain-g2")
    assert bench.Cell("cr", 8, 0, "contrastive-probe", 0).key == "cr-n8-s0-tfull-contrastive-probe"


def test_results_name_the_cpu_and_whether_bf16_native_ran_bf16(monkeypatch):
    from benchmarks.common import cpu_description
    from trainers import engines

    monkeypatch.setattr(engines, "native_bf16_cpu", lambda: True)
    assert cpu_description().endswith(f"{os.cpu_count()} cores, bf16 in hardware")
    monkeypatch.setattr(engines, "native_bf16_cpu", lambda: False)
    assert "(bf16-native: fp32)" in cpu_description()


def test_report_names_the_cpus_its_cells_ran_on():
    rows = [{"cpu": "Xeon"}, {"cpu": "Xeon"}, {"cpu": "EPYC"}, {}]
    assert bench.machines_of(rows) == ("Xeon (2 cells); EPYC (1 cell); a CPU not recorded "
                                       "(1 cell); shared, no GPU")
    assert bench.machines_of(rows[:2]) == "Xeon; shared, no GPU"

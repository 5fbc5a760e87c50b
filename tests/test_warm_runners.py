"""Warm trial runners: trials that share a process get exactly what a fresh process gives them,
keep their own files, and a crash in one leaves the others' results intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, ROOT

from cluster.tune import run_sweep, sweep_dir_of
from trainers import warm
from trainers.recipe import load_config

WORDS = {0: ["dull", "boring", "awful", "bad", "weak", "tired", "flat", "poor"],
         1: ["great", "lovely", "bright", "good", "fine", "warm", "vivid", "sharp"]}


def text_root(tmp_path: Path) -> Path:
    """A small two-class text dataset (train + test split) for MiniLM runs."""
    root = tmp_path / "text"
    root.mkdir()
    for split in ("train", "test"):
        rows = [f"{y}\t{'neg' if y == 0 else 'pos'}\ta {w} film, {w} story"
                for y, words in WORDS.items() for w in words]
        (root / f"{split}.tsv").write_text("label\tlabel_text\ttext\n" + "\n".join(rows) + "\n")
    return root


def minilm(tmp_path: Path, *overrides: str):
    return load_config(CONFIGS / "sst2-minilm.yaml", [
        f"data.root={text_root(tmp_path)}", "data.shots=3", "data.val_shots=2",
        "data.max_test=4", "data.max_length=16", "train.epochs=2", "train.batch_size=3",
        "train.progress=false", "train.save_checkpoints=false", "optim.warmup=0",
        f"train.output_dir={tmp_path / 'out'}", *overrides])


def trial_records(sweep: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (sweep / "runs").glob("*/trial.json")),
                  key=lambda r: r["started"])


def run_rows(run: Path) -> list[dict]:
    """A run's evaluation rows without their wall times (the only part that may differ)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


FRESH = """
import json, sys
from trainers.loop import fit
from trainers.recipe import load_config
cfg = load_config(sys.argv[1], [f"train.output_dir={sys.argv[2]}"], check_paths=False)
fit(cfg)
"""


def fresh_process_rows(config: Path, out: Path) -> list[dict]:
    """Train a saved trial config in a new Python process; its evaluation rows."""
    subprocess.run([sys.executable, "-c", FRESH, str(config), str(out)], cwd=ROOT, check=True,
                   timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    name = load_config(config, check_paths=False).run_dir.name
    return run_rows(out / name)


def test_a_kept_pretrained_model_is_copied_per_run_and_equals_a_load_from_disk(
        tmp_path: Path) -> None:
    from trainers.models import create_model

    cfg = minilm(tmp_path)
    warm.forget()
    torch.manual_seed(0)
    cold = create_model(cfg.model, 2)
    hits = warm.HITS["pretrained"]
    torch.manual_seed(0)
    kept = create_model(cfg.model, 2)
    assert warm.HITS["pretrained"] == hits + 1  # the second build came from memory
    a, b = cold.module.state_dict(), kept.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # head included
    with torch.no_grad():  # a run trains its own copy: the kept weights do not move
        next(kept.module.encoder.parameters()).add_(1.0)
    again = create_model(cfg.model, 2).module.state_dict()
    assert all(torch.equal(a[k], again[k]) for k in a if k.startswith("encoder."))


@pytest.mark.ray
@pytest.mark.slow
def test_trials_on_a_reused_runner_get_exactly_the_metrics_of_a_fresh_process(
        tmp_path: Path, local_ray) -> None:
    cfg = minilm(tmp_path, "tune.space={optim.lr: 'grid[3e-5, 1e-4, 3e-4]'}",
                 "tune.search=grid", "tune.num_samples=1", "tune.scheduler=none",
                 "tune.max_concurrent=1", "tune.name=warm")
    outcome = run_sweep(cfg)
    assert (outcome.trials, outcome.errors) == (3, 0)
    sweep = sweep_dir_of(cfg)
    records = trial_records(sweep)
    assert len({r["pid"] for r in records}) == 1, records  # one warm runner ran all three
    assert [r["runner_trial"] for r in records] == [1, 2, 3]
    for r in records:
        run = sweep / "runs" / r["trial_id"]
        own = load_config(run / "config.yaml", check_paths=False)
        assert own.train.run_name == r["trial_id"] and own.optim.lr == r["params"]["optim.lr"]
        in_sweep = run_rows(run)
        assert len(in_sweep) == cfg.train.epochs
        assert in_sweep == fresh_process_rows(run / "config.yaml", tmp_path / "fresh"), r
        tune_rows = [json.loads(line) for line in
                     (sweep / r["trial_id"] / "result.json").read_text().splitlines()]
        # one Tune report per evaluation; the last one ranks the trial by its best value
        *early, final = tune_rows
        seen = [h["val/accuracy"] for h in in_sweep]
        assert [t["val/accuracy"] for t in early] == seen[:-1]
        assert final.get("last_val/accuracy", final["val/accuracy"]) == seen[-1]
        assert final["val/accuracy"] == max(seen)


@pytest.mark.ray
def test_a_crash_on_a_shared_runner_leaves_the_other_trials_intact(tmp_path: Path,
                                                                   local_ray) -> None:
    from trainers.loop import fit

    # sgd with a coupled L2 term and no clipping: lr=10 overflows the loss (TrainingError)
    cfg = load_config(CONFIGS / "tiny-digits.yaml", [
        f"train.output_dir={tmp_path}", "train.progress=false", "train.epochs=3",
        "train.save_checkpoints=false", "optim.name=sgd", "optim.grad_clip=null",
        "optim.l2=0.3", "tune.space={optim.lr: 'grid[0.05, 10, 0.1]'}", "tune.search=grid",
        "tune.num_samples=1", "tune.scheduler=none", "tune.max_concurrent=1",
        "tune.max_failures=0", "tune.name=crash"])
    outcome = run_sweep(cfg)
    assert (outcome.trials, outcome.errors) == (3, 1)
    sweep = sweep_dir_of(cfg)
    first, bad, last = trial_records(sweep)
    assert bad["params"]["optim.lr"] == 10
    assert bad["pid"] == first["pid"] and bad["runner_trial"] == 2  # it shared the runner
    assert "loss became inf" in (sweep / bad["trial_id"] / "error.txt").read_text()
    for r in (first, last):
        run = sweep / "runs" / r["trial_id"]
        assert load_config(run / "config.yaml", check_paths=False).train.run_name == r["trial_id"]
        alone = fit(load_config(run / "config.yaml", [f"train.output_dir={tmp_path / 'alone'}"],
                                check_paths=False))
        assert run_rows(run) == [{k: v for k, v in h.items() if k != "time_s"}
                                 for h in alone.history]
        tune_rows = (sweep / r["trial_id"] / "result.json").read_text().splitlines()
        assert json.loads(tune_rows[-1])["training_iteration"] == cfg.train.epochs  # once each

"""The training loop: learning, checkpoints, exact resume, early stopping, NaN detection."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS
from interrupts import Interrupt, interrupted_at

from trainers.checkpoints import load_checkpoint_model
from trainers.errors import CheckpointError, SmallshotError
from trainers.loop import TrainingError, fit
from trainers.recipe import load_config


def tiny(tmp_path, *extra):
    return load_config(CONFIGS / "tiny-digits.yaml",
                       [f"train.output_dir={tmp_path}", "train.progress=false", *extra])


def test_fit_learns_and_writes_run_folder(tmp_path):
    cfg = tiny(tmp_path)
    result = fit(cfg)
    # 10 classes: chance is 0.1; a 20-shot MLP on digits gets far above it
    assert result.metrics["test/accuracy"] > 0.6
    losses = [row["train/loss"] for row in result.history]
    assert losses[-1] < losses[0]
    run = result.run_dir
    assert (run / "config.yaml").is_file() and (run / "labels.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.train.epochs and "val/accuracy" in rows[0]
    assert json.loads((run / "labels.json").read_text())["classes"][:2] == ["0", "1"]
    # a finished run keeps one checkpoint: the tested weights, which `latest` names for resume
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final", "latest"]
    assert sorted(p.name for p in (run / "checkpoints" / "final").iterdir()) == [
        "config.yaml", "model.pt", "progress.json", "result.json"]
    assert result.best_checkpoint == run / "checkpoints" / "final"
    # the best checkpoint loads back into a plain model that scores like the run did
    built = load_checkpoint_model(cfg, result.best_checkpoint, num_classes=10)
    assert sum(p.numel() for p in built.module.parameters()) > 0


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full = fit(tiny(tmp_path / "a", "train.epochs=4"))
    # interrupted after epoch 1 (step 7), then resumed from its latest checkpoint to the end
    part = tiny(tmp_path / "b", "train.epochs=4")
    with pytest.raises(Interrupt):
        fit(part, interrupted_at(7))
    resumed = fit(tiny(tmp_path / "b", "train.epochs=4", "train.resume=true"))
    assert resumed.steps == full.steps
    for key in ("test/accuracy", "test/f1", "best_val/accuracy"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], abs=1e-9), key
    assert [r["val/accuracy"] for r in resumed.history] == [r["val/accuracy"] for r in full.history]


def test_mid_epoch_checkpoints_resume_exactly(tmp_path):
    full = fit(tiny(tmp_path / "a", "train.eval_every=3", "train.epochs=2"))
    with pytest.raises(Interrupt):
        fit(tiny(tmp_path / "b", "train.eval_every=3", "train.epochs=2"), interrupted_at(9))
    resumed = fit(tiny(tmp_path / "b", "train.eval_every=3", "train.epochs=2",
                       "train.resume=true"))
    assert resumed.metrics["test/accuracy"] == pytest.approx(full.metrics["test/accuracy"])


def test_early_stopping_stops(tmp_path):
    # a zero learning rate never improves validation: patience 2 stops after 3 evaluations
    result = fit(tiny(tmp_path, "optim.lr=0", "train.patience=2", "train.epochs=20"))
    assert result.stopped_early and len(result.history) == 3


def test_nan_loss_is_reported_not_trained_on(tmp_path):
    from trainers.data import load_dataset

    cfg = tiny(tmp_path)
    data = load_dataset(cfg.data)
    data.train.inputs[3] = float("nan")  # one corrupted example poisons its batch's loss
    with pytest.raises(TrainingError, match="loss became nan at epoch 1.*check the data"):
        fit(cfg, data=data)
    assert not list((tmp_path).glob("*/checkpoints/step-*"))


def test_full_batch_gd_takes_one_step_per_epoch(tmp_path):
    result = fit(tiny(tmp_path, "optim.name=gd", "optim.lr=0.5", "train.epochs=3"))
    assert result.steps == 3


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SmallshotError, match="train.output_dir=.*cannot write"):
        fit(tiny(blocker))


def test_frozen_backbone_only_moves_head(tmp_path):
    cfg = tiny(tmp_path, "model.freeze_backbone=true", "train.epochs=1")
    torch.manual_seed(cfg.train.seed)
    from trainers.models import create_model

    before = create_model(cfg.model, 10).module.state_dict()
    result = fit(cfg)
    after = torch.load(result.best_checkpoint / "model.pt", weights_only=True)
    assert torch.equal(before["body.1.weight"], after["body.1.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_resuming_from_the_final_checkpoint_trains_nothing(tmp_path):
    from trainers.loop import Hooks

    first = fit(tiny(tmp_path, "train.epochs=2"))
    import shutil

    final = shutil.copytree(first.run_dir / "checkpoints" / "final", tmp_path / "handed-over")
    again = fit(tiny(tmp_path, "train.epochs=2"), Hooks(resume_from=final))
    assert again.steps == first.steps and again.history == first.history
    assert again.metrics["test/accuracy"] == pytest.approx(first.metrics["test/accuracy"])
    # asking a finished run for more steps than it took is refused: its optimizer state is gone
    with pytest.raises(CheckpointError, match="finished run.*train a new run"):
        fit(tiny(tmp_path, "train.epochs=3", f"train.run_name={first.run_dir.name}",
                 "train.resume=true"))


def test_zero_epochs_scores_the_prepared_model_without_training(tmp_path):
    # lp-ft with epochs=0 is a linear probe: evaluated once (epoch 0), no optimizer step
    result = fit(tiny(tmp_path, "model.strategy=lp-ft", "train.epochs=0"))
    assert result.steps == 0 and result.epochs == 0
    assert [row["epoch"] for row in result.history] == [0.0]
    assert "train/loss" not in result.metrics  # no step, so no training loss to show
    assert result.metrics["test/accuracy"] > 0.6  # the probe alone fits 20-shot digits


def test_eval_at_start_adds_epoch_zero_to_the_history(tmp_path):
    plain = fit(tiny(tmp_path, "train.epochs=2", "train.run_name=plain"))
    start = fit(tiny(tmp_path, "train.epochs=2", "train.eval_at_start=true",
                     "train.run_name=start"))
    assert [row["epoch"] for row in start.history] == [0.0, 1.0, 2.0]
    # evaluating first changes nothing that follows
    assert start.history[1:] == [{**r, "time_s": s["time_s"]}
                                 for r, s in zip(plain.history, start.history[1:])]

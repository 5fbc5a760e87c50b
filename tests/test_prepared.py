"""A strategy's prepared model shared between runs that differ only after it (trainers.prepared)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import CONFIGS, need_shared

from trainers.loop import fit
from trainers.recipe import load_config


def text(tmp_path: Path, *extra: str):
    root = need_shared("data", "text", "sst2")
    return load_config(CONFIGS / "fewshot-minilm.yaml",
                       [f"data.root={root}", "data.shots=4", "data.max_length=16",
                        "data.max_test=16", "train.batch_size=8", "train.progress=false",
                        "model.strategy_params.contrastive.iterations=1",
                        f"train.output_dir={tmp_path}", *extra])


def test_a_run_that_differs_after_the_strategy_reuses_its_preparation_exactly(tmp_path):
    cache = tmp_path / "prepared"
    first = fit(text(tmp_path, "train.epochs=0", f"train.prepared_cache={cache}",
                     "train.run_name=first"))
    assert "prepared" not in first.timings and len(list(cache.glob("*.pt"))) == 1

    reused = fit(text(tmp_path, "train.epochs=1", f"train.prepared_cache={cache}",
                      "train.save_checkpoints=true", "train.run_name=reused"))
    alone = fit(text(tmp_path, "train.epochs=1", "train.save_checkpoints=true",
                     "train.run_name=alone"))
    assert "prepared" in reused.timings and "prepared" not in alone.timings
    # the same weights and random state as preparing it here: the same run, bit for bit
    assert reused.metrics == alone.metrics
    assert [r["train/loss"] for r in reused.history] == [r["train/loss"] for r in alone.history]
    a = torch.load(reused.best_checkpoint / "model.pt", weights_only=True)
    b = torch.load(alone.best_checkpoint / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # what the strategy reads is part of the key: another pair stage prepares its own model
    other = fit(text(tmp_path, "train.epochs=0", f"train.prepared_cache={cache}",
                     "model.strategy_params.contrastive.iterations=2", "train.run_name=other"))
    assert "prepared" not in other.timings and len(list(cache.glob("*.pt"))) == 2
    seeded = fit(text(tmp_path, "train.epochs=0", f"train.prepared_cache={cache}",
                      "train.seed=1", "train.run_name=seeded"))
    assert "prepared" not in seeded.timings and len(list(cache.glob("*.pt"))) == 3


def test_strategies_not_marked_reusable_never_touch_the_cache(tmp_path):
    cache = tmp_path / "prepared"
    for name in ("a", "b"):
        result = fit(text(tmp_path, "model.strategy=full", "train.epochs=0",
                          f"train.prepared_cache={cache}", f"train.run_name={name}"))
        assert "prepared" not in result.timings
    assert not cache.exists()


def test_a_cache_that_cannot_be_written_costs_reuse_not_the_run(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trainers.prepared.torch.save", disk_full)
    cache = tmp_path / "prepared"
    result = fit(text(tmp_path, "train.epochs=0", f"train.prepared_cache={cache}"))
    assert "test/accuracy" in result.metrics and not list(cache.glob("*.pt*"))
    assert "could not keep the prepared model" in capsys.readouterr().out
    # a cache folder that cannot be made: the same
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = fit(text(tmp_path, "train.epochs=0", f"train.prepared_cache={blocker / 'sub'}",
                      "train.run_name=blocked"))
    assert "test/accuracy" in result.metrics
    assert "could not keep the prepared model" in capsys.readouterr().out

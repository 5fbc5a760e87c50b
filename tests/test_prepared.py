"""A strategy's prepared model shared between runs that differ only after it (trainers.prepared)."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_a_fold_soup_is_the_mean_of_the_sweeps_fold_preparations(tmp_path, capsys):
    from cluster.report import final_config
    from cluster.trial import trial_config

    base = text(tmp_path, "data.folds=2", "tune.refit=soup", "train.epochs=0",
                "data.max_test=8", "model.soup_topup=0").with_absolute_paths()
    sweep_dir = tmp_path / "sweep"
    trial = trial_config(base, {}, "t0", sweep_dir)  # as a k-fold sweep's trial trains
    for fold in range(2):
        fit(trial.replace({"data.fold": fold, "train.run_name": f"t0/fold-{fold}"}))
    cache = Path(trial.train.prepared_cache)
    files = sorted(cache.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2
    capsys.readouterr()

    final = final_config(base.replace({"train.save_checkpoints": True, "train.run_name": "soup"}),
                         sweep_dir)
    assert (final.model.soup_folds, final.data.folds) == (2, 0)
    soup = fit(final)
    assert "(2 reused from train.prepared_cache)" in capsys.readouterr().out
    assert "prepared" in soup.timings and len(list(cache.glob("*.pt"))) == 2
    folds = [torch.load(p, weights_only=True)["model"] for p in files]
    got = torch.load(soup.best_checkpoint / "model.pt", weights_only=True)
    body = [k for k in got if got[k].is_floating_point() and "classifier" not in k
            and not k.startswith("head")]
    assert body and all(torch.allclose(got[k], (folds[0][k] + folds[1][k]) / 2, atol=1e-6)
                        for k in body)
    head = [k for k in got if k not in body and got[k].is_floating_point()]
    # the probe is refit on all 8 shots, not the mean of the folds' probes on 4
    assert head and not all(torch.allclose(got[k], (folds[0][k] + folds[1][k]) / 2)
                            for k in head)

    # the same model as preparing the two folds here, without the sweep's cache
    fresh = fit(final.replace({"train.prepared_cache": None, "train.run_name": "fresh"}))
    assert "(0 reused" in capsys.readouterr().out
    mine = torch.load(fresh.best_checkpoint / "model.pt", weights_only=True)
    assert all(torch.equal(mine[k], got[k]) for k in got)
    assert fresh.metrics["test/accuracy"] == soup.metrics["test/accuracy"]


def test_a_topped_up_soup_trains_a_few_rounds_on_all_shots_from_the_mean(tmp_path, capsys):
    from cluster.report import final_config
    from cluster.trial import trial_config

    base = text(tmp_path, "data.folds=2", "tune.refit=soup", "train.epochs=0",
                "data.max_test=8", "model.soup_topup=1").with_absolute_paths()
    sweep_dir = tmp_path / "sweep"
    trial = trial_config(base, {}, "t0", sweep_dir)  # model.soup_topup is not in their key
    for fold in range(2):
        fit(trial.replace({"data.fold": fold, "train.run_name": f"t0/fold-{fold}"}))
    final = final_config(base.replace({"train.save_checkpoints": True}), sweep_dir)
    capsys.readouterr()
    runs = {}
    for name, topup in (("plain", 0), ("topped", 1)):
        runs[name] = fit(final.replace({"model.soup_topup": topup, "train.run_name": name}))
        out = capsys.readouterr().out
        assert "(2 reused from train.prepared_cache)" in out
        assert ("1 more round(s) and the probe on 8 examples" in out) == bool(topup)
    plain, topped = (torch.load(runs[n].best_checkpoint / "model.pt", weights_only=True)
                     for n in ("plain", "topped"))
    body = [k for k in plain if plain[k].is_floating_point() and "embeddings" not in k
            and "classifier" not in k and not k.startswith("head")]
    assert body and not all(torch.allclose(plain[k], topped[k]) for k in body)  # it trained
    # without the sweep's cache: the same folds, the same top-up, bit for bit
    fresh = fit(final.replace({"train.prepared_cache": None, "train.run_name": "fresh"}))
    mine = torch.load(fresh.best_checkpoint / "model.pt", weights_only=True)
    assert all(torch.equal(mine[k], topped[k]) for k in topped)

    # lp-ft has no rounds: its soup is the probe refit, topped up or not
    probes = [fit(final.replace({"model.strategy": "lp-ft", "model.soup_topup": n,
                                 "train.run_name": f"lp-{n}"})).metrics for n in (0, 1)]
    assert probes[0] == probes[1]


def test_fold_soup_settings_that_cannot_work_are_refused_up_front(tmp_path):
    from cluster.tune import check_sweep
    from trainers.errors import ConfigError

    with pytest.raises(ConfigError, match="model.soup_folds: 1 is not a split"):
        text(tmp_path, "model.soup_folds=1")
    with pytest.raises(ConfigError, match="the soup is the final run's.*set data.folds=0"):
        text(tmp_path, "model.soup_folds=2", "data.folds=2")
    with pytest.raises(ConfigError, match="model.strategy=full leaves no probe head"):
        fit(text(tmp_path, "model.soup_folds=2", "model.strategy=full"))
    with pytest.raises(ConfigError, match="tune.refit=soup: .*set data.folds=k"):
        check_sweep(text(tmp_path, "tune.refit=soup"))

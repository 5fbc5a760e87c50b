"""Self-training on unlabelled examples: the pool, class-balanced picks, exact resume, no test reads."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import CONFIGS
from interrupts import Interrupt, interrupted_at
from tiny_hf import make_tiny_hf, write_text_dataset

from trainers.data import load_dataset
from trainers.errors import ConfigError
from trainers.loop import fit
from trainers.recipe import load_config
from trainers.selftrain import RECORD, balanced_picks

SELFTRAIN = ["data.unlabeled=rest", "selftrain.rounds=2", "selftrain.per_class=5"]


def digits(tmp_path, *extra):
    return load_config(CONFIGS / "tiny-digits.yaml",
                       [f"train.output_dir={tmp_path}", "train.progress=false",
                        "model.strategy=lp-ft", "train.epochs=2", *extra])


def test_balanced_picks_take_the_most_confident_of_each_class_equally():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6, 0.55, 0.99])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    assert balanced_picks(conf, pred, 3, per_class=5, threshold=0.0).tolist() == [0, 3, 6]
    assert balanced_picks(conf, pred, 2, per_class=2, threshold=0.0).tolist() == [0, 1, 3, 4]
    # a class with nothing at or above the threshold: nothing is added for any class
    assert balanced_picks(conf, pred, 2, per_class=2, threshold=0.92).tolist() == []


def test_rest_holds_every_undrawn_example_without_labels(tmp_path):
    cfg = digits(tmp_path, "data.unlabeled=rest", "data.max_unlabeled=100000").data
    data = load_dataset(cfg, with_test=False)
    drawn = set(data.train.sources) | set(data.val.sources)
    assert data.unlabeled is not None and set(data.unlabeled.labels.tolist()) == {-1}
    assert not drawn & set(data.unlabeled.sources)
    # every example of the train split is drawn or unlabelled
    whole = load_dataset(dataclasses.replace(cfg, shots=None, val_shots=0), with_test=False)
    assert len(drawn) + len(data.unlabeled) == len(whole.train)
    # k-fold: the held-out fold is part of the draw, never of the pool
    folds = load_dataset(digits(tmp_path, "data.unlabeled=rest", "data.val_shots=0",
                                "data.folds=2", "data.max_unlabeled=100000").data, with_test=False)
    assert not (set(folds.train.sources) | set(folds.val.sources)) & set(folds.unlabeled.sources)
    capped = load_dataset(digits(tmp_path, "data.unlabeled=rest", "data.max_unlabeled=50").data,
                          with_test=False)
    again = load_dataset(digits(tmp_path, "data.unlabeled=rest", "data.max_unlabeled=50").data,
                         with_test=False)
    assert len(capped.unlabeled) == 50 and capped.unlabeled.sources == again.unlabeled.sources


def test_self_training_adds_balanced_pseudo_labels_that_are_mostly_right(tmp_path):
    result = fit(digits(tmp_path, *SELFTRAIN, "train.save_checkpoints=false"))
    record = json.loads((result.run_dir / RECORD).read_text())
    assert [r["pseudo_labels"] for r in record["rounds"]] == [50, 100]  # 10 classes x 5 x round
    assert all(r["per_class"] == [10] * 10 for r in record["rounds"][1:])
    # digits[i] names the example: its true label tells how good the pseudo-labels are
    from sklearn.datasets import load_digits

    truth = load_digits().target
    right = [int(truth[int(s[7:-1])]) == y for s, y in zip(record["sources"], record["labels"])]
    assert sum(right) / len(right) > 0.8, sum(right) / len(right)
    # the fine-tuning epochs trained on 200 labelled + 100 pseudo-labelled examples
    assert result.steps == 2 * -(-300 // 32)
    assert result.metrics["test/accuracy"] > 0.6


def test_self_trained_run_resumes_exactly(tmp_path):
    full = fit(digits(tmp_path / "a", *SELFTRAIN, "train.epochs=4"))
    with pytest.raises(Interrupt):
        fit(digits(tmp_path / "b", *SELFTRAIN, "train.epochs=4"), interrupted_at(12))
    resumed = fit(digits(tmp_path / "b", *SELFTRAIN, "train.epochs=4", "train.resume=true"))
    assert resumed.steps == full.steps
    for key in ("test/accuracy", "test/f1", "best_val/accuracy"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], abs=1e-9), key
    (resumed.run_dir / RECORD).unlink()
    with pytest.raises(Exception, match=f"{RECORD}: missing"):
        fit(digits(tmp_path / "b", *SELFTRAIN, "train.epochs=4", "train.resume=true"))


def test_self_training_reads_an_unlabelled_file_and_never_the_test_split(tmp_path):
    model = make_tiny_hf(tmp_path / "bert", "bert")
    root = write_text_dataset(tmp_path / "toy", n_per_class=20)
    pool = tmp_path / "pool.tsv"
    pool.write_text("text\n" + "\n".join(["good fun movie", "awful boring plot",
                                          "the best film", "sad and dull"] * 5) + "\n")
    (root / "test.tsv").write_bytes(b"\xff\xfe\x00 not a table")  # opening it would fail
    cfg = load_config(None, [
        "data.format=text", f"data.root={root}", "data.shots=4", f"data.unlabeled={pool}",
        f"model.name=hf:{model}", "model.pretrained=false", "model.pooling=mean",
        "model.strategy=lp-ft", "selftrain.rounds=1", "selftrain.per_class=3", "train.epochs=1",
        "train.test=false", "train.progress=false", "train.save_checkpoints=false",
        f"train.output_dir={tmp_path / 'out'}"])
    result = fit(cfg)
    record = json.loads((result.run_dir / RECORD).read_text())
    assert record["rounds"][0]["pseudo_labels"] <= 6 and all(
        s.startswith(str(pool)) for s in record["sources"])
    assert not any(k.startswith("test/") for k in result.metrics)


@pytest.mark.parametrize(("extra", "message"), [
    (["selftrain.rounds=2"], "selftrain.rounds=2: self-training needs unlabelled examples"),
    (["data.unlabeled=rest", "data.test_split=null"], "data.unlabeled=rest with "
                                                      "data.test_split=null"),
    (["data.unlabeled=/no/such/file.tsv", "data.format=text", "data.root=."],
     "data.unlabeled: '/no/such/file.tsv' does not exist"),
    (["data.unlabeled=pool.tsv"], "an unlabelled file is read as text"),
])
def test_bad_self_training_settings_are_one_line_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as e:
        digits(tmp_path, *extra)
    assert "\n" not in str(e.value)


def tiny_text(tmp_path, *extra):
    """A contrastive few-shot run of a tiny random BERT, self-trained on the undrawn rest."""
    model = make_tiny_hf(tmp_path / "bert", "bert")
    root = write_text_dataset(tmp_path / "toy", n_per_class=20)
    return load_config(None, [
        "data.format=text", f"data.root={root}", "data.shots=4", "data.val_shots=0",
        "data.unlabeled=rest", f"model.name=hf:{model}", "model.pretrained=false",
        "model.pooling=mean", "model.strategy=contrastive",
        "model.strategy_params.contrastive.iterations=1", "selftrain.rounds=1",
        "selftrain.per_class=3", "train.epochs=0", "train.batch_size=4", "train.progress=false",
        "train.save_checkpoints=false", f"train.output_dir={tmp_path / 'out'}", *extra])


def test_pair_rounds_train_the_body_on_the_pseudo_labels_too(tmp_path, monkeypatch):
    from trainers import strategies

    staged = []  # the examples each pair stage trains on
    real = strategies.contrastive_stage

    def watched(cfg, built, train, device, **kw):
        staged.append((len(train), kw["iterations"]))
        return real(cfg, built, train, device, **kw)

    monkeypatch.setattr(strategies, "contrastive_stage", watched)
    probe_only = fit(tiny_text(tmp_path, "train.run_name=probe"))
    assert staged == [(8, 1)]  # 2 classes x 4 shots; the pseudo-labels refit the probe alone
    paired = fit(tiny_text(tmp_path, "selftrain.pair_rounds=2", "train.run_name=pairs"))
    # the same picks, then 2 more rounds on the 8 labelled + 2 x 3 pseudo-labelled examples
    assert staged[1:] == [(8, 1), (14, 2)]
    picks = [json.loads((r.run_dir / RECORD).read_text())["sources"] for r in (probe_only, paired)]
    assert picks[0] == picks[1] and len(picks[0]) == 6
    # a strategy without rounds (lp-ft) has no pair stage: its probe learns from them, as before
    lp = [fit(tiny_text(tmp_path, "model.strategy=lp-ft", *more, f"train.run_name=lp{i}")).metrics
          for i, more in enumerate(([], ["selftrain.pair_rounds=2"]))]
    test = [{k: v for k, v in m.items() if k.startswith("test/")} for m in lp]
    assert len(staged) == 3 and test[0] == test[1] and test[0]


def test_a_run_self_trained_with_pair_rounds_resumes_exactly(tmp_path):
    common = ["selftrain.pair_rounds=2", "train.epochs=3", "train.save_checkpoints=true"]
    full = fit(tiny_text(tmp_path / "a", *common))
    with pytest.raises(Interrupt):
        fit(tiny_text(tmp_path / "b", *common), interrupted_at(5))
    resumed = fit(tiny_text(tmp_path / "b", *common, "train.resume=true"))
    assert resumed.steps == full.steps
    for key in ("test/accuracy", "test/f1", "test/mcc"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], abs=1e-9), key

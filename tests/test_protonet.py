"""Episodic metric learning and transfer: episodes, protonet, rotated classes, model.init_from,
staged recipes (tiny models on scikit-learn's digits; seconds, no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import CONFIGS, ROOT
from interrupts import Interrupt, interrupted_at

from trainers.episodes import EpisodeSampler, EpisodeShape, epoch_episodes, rotated_classes
from trainers.errors import CheckpointError, ConfigError, DataError
from trainers.loop import fit
from trainers.recipe import load_config
from trainers.stages import load_stages
from trainers.strategies import ProtoNet, make_strategy, set_prototype_head

PROTO = ["model.name=conv4:8", "model.strategy=protonet",
         "model.strategy_params={protonet: {ways: 5, shots: 2, queries: 3, episodes: 6}}"]


def digits(tmp_path, *extra):
    return load_config(CONFIGS / "tiny-digits.yaml",
                       [f"train.output_dir={tmp_path}", "train.progress=false", *extra])


# -- episodes ---------------------------------------------------------------------------------

def test_episodes_are_seeded_stratified_and_cover_every_class():
    labels = [c for c in range(12) for _ in range(7)]
    shape = EpisodeShape(ways=5, shots=2, queries=3)
    a = EpisodeSampler(labels, shape, seed=3)
    eps = a.epoch(0, 12)
    assert eps == EpisodeSampler(labels, shape, seed=3).epoch(0, 12)  # a pure function
    assert eps != EpisodeSampler(labels, shape, seed=4).epoch(0, 12) != a.epoch(1, 12)
    for ep in eps:
        assert len(ep) == shape.size and len(set(ep)) == shape.size  # no example twice
        support, query = ep[:10], ep[10:]
        classes = [labels[i] for i in support[::2]]
        assert len(set(classes)) == 5  # 5 different classes
        assert [labels[i] for i in support] == [c for c in classes for _ in range(2)]
        assert [labels[i] for i in query] == [c for c in classes for _ in range(3)]
    # classes are drawn pass by pass: every class takes part, and equally often (within 1)
    counts = Counter(labels[i] for ep in eps for i in ep[:10:2])
    assert set(counts) == set(range(12)) and max(counts.values()) - min(counts.values()) <= 1
    # ranks split one epoch's episodes between them, padded to the same count
    shares = [epoch_episodes(a, 0, 5, r, 2) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 3
    five = a.epoch(0, 5)
    assert shares[0] == five[0::2] and shares[1] == five[1::2] + five[:1]


def test_episodes_refuse_too_few_classes_or_examples():
    with pytest.raises(DataError, match="20-way episodes need at least 20 classes"):
        EpisodeSampler([0, 1, 2] * 5, EpisodeShape(20, 1, 1), 0)
    with pytest.raises(DataError, match="need 6 examples per class; class 1 has 2"):
        EpisodeSampler([0] * 6 + [1] * 2, EpisodeShape(2, 1, 5), 0)


def test_rotated_classes_are_new_classes():
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    xs, ys, names, _ = rotated_classes(x, torch.tensor([0, 1]), ["a", "b"])
    assert ys.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and names[2:4] == ["a@rot90", "b@rot90"]
    assert torch.equal(xs[2], torch.rot90(x[0], 1, (-2, -1)))


# -- protonet ---------------------------------------------------------------------------------

def test_prototype_head_equals_nearest_prototype():
    torch.manual_seed(0)
    protos, x = torch.randn(4, 6), torch.randn(50, 6)
    for metric in ("euclidean", "cosine"):
        head = torch.nn.Linear(6, 4)
        set_prototype_head(head, protos, metric, 10.0)
        want = (torch.cdist(x, protos).argmin(1) if metric == "euclidean" else
                (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(
                    protos, dim=1).T).argmax(1))
        assert torch.equal(head(x).argmax(1), want)
    # euclidean: the head's softmax is exactly the protonet's softmax(-|x - c|^2)
    head = torch.nn.Linear(6, 4)
    set_prototype_head(head, protos, "euclidean", 1.0)
    assert torch.allclose(head(x).softmax(1), (-torch.cdist(x, protos) ** 2).softmax(1),
                          atol=1e-5)


def test_strategy_params_are_checked_against_the_signature(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'model.strategy_params=\{protonet: \{way: 5\}\}': "
                       r"model.strategy_params.protonet.way: unknown parameter of strategy 'protonet' "
                       r".*did you mean 'ways'"):
        digits(tmp_path, "model.strategy=protonet", "model.strategy_params={protonet: {way: 5}}")
    with pytest.raises(ConfigError, match="metric='l1'"):
        make_strategy("protonet", {"metric": "l1"})
    assert isinstance(make_strategy("protonet", {"ways": 3}), ProtoNet)


def test_protonet_learns_and_resumes_exactly(tmp_path):
    full = fit(digits(tmp_path / "a", *PROTO, "train.epochs=3"))
    assert full.steps == 18  # 3 epochs x 6 episodes
    assert full.metrics["test/accuracy"] > 0.5  # 10 digits; chance is 0.1
    with pytest.raises(Interrupt):  # a crash right after the first epoch's checkpoint
        fit(digits(tmp_path / "b", *PROTO, "train.epochs=3"), interrupted_at(6))
    resumed = fit(digits(tmp_path / "b", *PROTO, "train.epochs=3", "train.resume=true"))
    assert resumed.steps == 18
    assert [r["val/accuracy"] for r in resumed.history] == [r["val/accuracy"] for r in full.history]
    assert resumed.history[-1]["train/loss"] == full.history[-1]["train/loss"]
    assert resumed.metrics["test/accuracy"] == pytest.approx(full.metrics["test/accuracy"],
                                                             abs=1e-9)


# -- init_from and stages -----------------------------------------------------------------------

def test_init_from_takes_the_backbone_and_records_provenance(tmp_path):
    source = fit(digits(tmp_path, *PROTO, "train.epochs=1", "augment.rotated_classes=true"))
    labels = json.loads((source.run_dir / "labels.json").read_text())["classes"]
    assert len(labels) == 40 and labels[10] == "0@rot90"
    cfg = digits(tmp_path, "model.name=conv4:8", f"model.init_from={source.run_dir}",
                 "model.strategy=protonet", "train.epochs=0", "train.run_name=few")
    result = fit(cfg)
    prov = json.loads((result.run_dir / "init_from.json").read_text())
    assert prov["source_run"] == str(source.run_dir)
    assert prov["source_config_digest"] == source.run_dir.name.rsplit("-", 1)[1]
    state = torch.load(source.run_dir / "checkpoints" / "final" / "model.pt", weights_only=True)
    mine = torch.load(result.run_dir / "checkpoints" / "final" / "model.pt", weights_only=True)
    assert torch.equal(state["body.0.weight"], mine["body.0.weight"])  # the backbone came over
    assert state["linear.weight"].shape[0] == 40 and mine["linear.weight"].shape[0] == 10


def test_init_from_refuses_an_incompatible_backbone_in_one_line(tmp_path):
    source = fit(digits(tmp_path, "train.epochs=1"))  # an mlp
    cfg = digits(tmp_path, "model.name=conv4:8", f"model.init_from={source.run_dir}")
    with pytest.raises(CheckpointError) as err:
        fit(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "weights do not fit" in msg and "model.name='mlp:64'" in msg
    proc = subprocess.run([sys.executable, "launch.py", "train", str(CONFIGS / "tiny-digits.yaml"),
                           f"train.output_dir={tmp_path}", "model.name=conv4:8",
                           f"model.init_from={source.run_dir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model.init_from=") and proc.stderr.count("\n") == 1
    with pytest.raises(ConfigError, match="model.init_from: .* does not exist"):
        digits(tmp_path, f"model.init_from={tmp_path / 'nope'}")


STAGED = """
name: two
data: {format: digits, channels: 1, mean: [0.3], std: [0.4], max_test: 200}
model: {name: "conv4:8"}
optim: {name: adam, lr: 3.0e-3, warmup: 0.0, schedule: constant}
train: {batch_size: 16, eval_batch_size: 256}
stages:
  pretrain:
    data: {shots: 30, val_shots: 0}
    model: {strategy: protonet, strategy_params: {protonet: {ways: 5, shots: 2, queries: 3, episodes: 4}}}
    train: {epochs: 2}
  few:
    data: {shots: 2, seed: 1}
    model: {init_from: pretrain, strategy: protonet}
    train: {epochs: 2}
"""


def test_two_stage_recipe_runs_end_to_end_and_resumes(tmp_path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(STAGED)
    out = tmp_path / "runs"
    cmd = [sys.executable, "launch.py", "train", str(recipe), f"train.output_dir={out}",
           "train.progress=false"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    pre, few = load_stages(recipe, [f"train.output_dir={out}"])
    assert few.model.init_from == str(pre.run_dir)
    assert json.loads((few.run_dir / "init_from.json").read_text())["source_run"] == str(pre.run_dir)
    results = [json.loads((c.run_dir / "result.json").read_text()) for c in (pre, few)]
    assert results[0]["metrics"]["steps"] == 8 and results[1]["metrics"]["steps"] == 4
    # resumed: both stages are finished, so nothing trains again and the results stand
    again = subprocess.run(cmd + ["train.resume=true"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("resumed from") == 2
    for c, before in zip((pre, few), results):
        after = json.loads((c.run_dir / "result.json").read_text())
        assert after["metrics"] == before["metrics"]
    # one stage's override; a later stage naming a stage that comes after it is refused
    pre2, few2 = load_stages(recipe, [f"train.output_dir={out}", "stages.pretrain.train.epochs=1"])
    assert pre2.train.epochs == 1 and few2.train.epochs == 2 and few2.run_dir != few.run_dir
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        load_stages(recipe, ["stages.nope.train.epochs=1"])
    recipe.write_text(STAGED.replace("init_from: pretrain", "init_from: few"))
    with pytest.raises(ConfigError, match="that stage must come earlier"):
        load_stages(recipe)

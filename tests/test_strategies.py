"""Fine-tuning strategies: full, lp-ft (linear probe then fine-tune), contrastive (SetFit-style)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import CONFIGS, need_shared
from interrupts import Interrupt, interrupted_at

from trainers.batches import Batcher, inference_batches
from trainers.data import Split, load_dataset
from trainers.errors import ConfigError
from trainers.loop import fit
from trainers.models import create_model
from trainers.recipe import load_config
from trainers.strategies import (
    STRATEGIES,
    PairModel,
    apply_strategy,
    contrastive_stage,
    create_strategy,
    fit_linear_probe,
    head_inputs,
    head_module,
    make_pairs,
    pair_batch_loss,
    pair_loss,
    probe_head,
    register_strategy,
    strategy_params,
    supcon_batches,
    supcon_loss,
    swapped_head,
    zero_shot_prior,
)

CPU = torch.device("cpu")


def digits(tmp_path, *extra):
    return load_config(CONFIGS / "tiny-digits.yaml",
                       [f"train.output_dir={tmp_path}", "train.progress=false",
                        "train.save_checkpoints=false", *extra])


def text(tmp_path, *extra):
    root = need_shared("data", "text", "sst2")
    return load_config(CONFIGS / "fewshot-minilm.yaml",
                       [f"data.root={root}", "data.shots=4", "data.max_length=16",
                        "data.max_test=16", "train.epochs=1", "train.batch_size=8",
                        f"train.output_dir={tmp_path}", *extra])


def train_accuracy(built, batcher, split) -> float:
    built.module.eval()
    with torch.no_grad():
        logits = built.module(**batcher.inputs(split, list(range(len(split)))))
    built.module.train()
    return float((logits.argmax(-1) == split.labels).float().mean())


def test_unknown_strategy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.strategy: unknown strategy 'probe-ft'"):
        digits(tmp_path, "model.strategy=probe-ft")
    with pytest.raises(ConfigError, match="allowed: full, lp-ft, contrastive"):
        create_strategy("nope")
    assert {"full", "lp-ft", "contrastive"} <= set(STRATEGIES)


def test_make_pairs_are_balanced_correct_and_seeded():
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    pairs = make_pairs(labels, iterations=3, seed=5)
    assert len(pairs) == 2 * 3 * len(labels)
    assert sum(t for *_, t in pairs) == 3 * len(labels)  # half positive
    for i, j, t in pairs:
        assert (labels[i] == labels[j]) == (t == 1.0) and (t == 0.0 or i != j)
    assert pairs == make_pairs(labels, 3, 5) and pairs != make_pairs(labels, 3, 6)


def test_unique_pairs_cover_every_pair_evenly_on_the_same_budget():
    from collections import Counter

    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    pairs = make_pairs(labels, iterations=3, seed=5, sampling="unique")
    anchored = make_pairs(labels, iterations=3, seed=5)
    assert Counter(t for *_, t in pairs) == Counter(t for *_, t in anchored)  # 24 and 24
    for i, j, t in pairs:
        assert i < j and (labels[i] == labels[j]) == (t == 1.0)
    for target, distinct in ((1.0, 3 + 3 + 1), (0.0, 28 - 7)):
        seen = Counter((i, j) for i, j, t in pairs if t == target)
        assert len(seen) == distinct  # every distinct pair drawn ...
        assert max(seen.values()) - min(seen.values()) <= 1  # ... before any drawn again
    assert pairs == make_pairs(labels, 3, 5, "unique") != make_pairs(labels, 3, 6, "unique")


def test_linear_probe_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)) + np.repeat(np.eye(3, 5) * 2, 10, axis=0)
    y = np.repeat(np.arange(3), 10)
    w, b = fit_linear_probe(torch.tensor(x, dtype=torch.float32), torch.tensor(y), 3, c=1.0)
    ours = torch.softmax(torch.tensor(x, dtype=torch.float32) @ w.T + b, -1).numpy()
    ref = LogisticRegression(C=1.0, max_iter=2000, tol=1e-10).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_lp_ft_probe_fits_the_training_set_and_fit_runs(tmp_path):
    cfg = digits(tmp_path, "model.strategy=lp-ft", "train.epochs=1")
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    built = create_model(cfg.model, data.num_classes)
    batcher = Batcher(cfg, built, CPU)
    random_head = train_accuracy(built, batcher, data.train)
    before = head_inputs(built, batcher, data.train, 64).clone()
    create_strategy("lp-ft")(cfg, built, data.train, CPU)
    probed = train_accuracy(built, batcher, data.train)
    assert probed >= random_head and probed > 0.9
    # the probe touched the head only
    assert torch.equal(head_inputs(built, batcher, data.train, 64), before)
    result = fit(cfg)
    assert result.metrics["test/accuracy"] > 0.5 and result.steps >= 1


def test_contrastive_stage_lowers_the_pair_loss_on_digits(tmp_path):
    cfg = digits(tmp_path, "model.strategy=contrastive",
                 "model.strategy_params={contrastive: {lr: 3.0e-3, iterations: 10}}")
    data = load_dataset(cfg.data, with_test=False)
    torch.manual_seed(0)
    built = create_model(cfg.model, data.num_classes)
    head_before = head_module(built).weight.detach().clone()
    before = pair_loss(cfg, built, data.train, CPU)
    losses, feats, _ = contrastive_stage(cfg, built, data.train, CPU, **strategy_params(cfg))
    after = pair_loss(cfg, built, data.train, CPU)
    assert after < 0.8 * before, (before, after)
    assert len(losses) == -(-2 * 10 * len(data.train) // cfg.train.batch_size)
    assert feats.shape == (len(data.train), cfg.model.params.get("hidden", 64))  # mlp default
    assert torch.equal(head_module(built).weight, head_before)  # the stage leaves the head be


def test_pair_batches_encode_each_example_once_and_score_every_pair(tmp_path):
    cfg = digits(tmp_path)
    data = load_dataset(cfg.data, with_test=False)
    torch.manual_seed(0)
    built = create_model(cfg.model, data.num_classes)
    batcher = Batcher(cfg, built, CPU)
    pairs = [(0, 1, 1.0), (0, 2, 0.0), (3, 0, 0.0), (2, 2, 1.0)]  # texts 0, 1, 2, 3
    seen = []
    built.module.eval()
    with torch.no_grad(), swapped_head(built, torch.nn.Identity()):
        model = PairModel(built.module)
        loss = pair_batch_loss(lambda **x: seen.append(x["a_pixels"].shape[0]) or model(**x),
                               batcher, data.train, pairs, [0, 1, 2, 3], CPU)
        emb = built.module(**batcher.inputs(data.train, list(range(4))))
    cos = torch.stack([torch.nn.functional.cosine_similarity(emb[i], emb[j], dim=0)
                       for i, j, _ in pairs])
    torch.testing.assert_close(loss, ((cos - torch.tensor([1.0, 0.0, 0.0, 1.0])) ** 2).mean())
    assert seen == [4]  # 8 slots, 4 distinct examples, one forward


def test_supcon_loss_matches_its_definition_and_prefers_tight_classes():
    torch.manual_seed(0)
    emb, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 1, 2])  # class 2: no partner
    z = torch.nn.functional.normalize(emb, dim=-1)
    by_hand = []
    for i in range(5):  # the one example without a same-class partner is no anchor
        others = [a for a in range(6) if a != i]
        log_den = torch.logsumexp(torch.stack([z[i] @ z[a] / 0.1 for a in others]), 0)
        pos = [p for p in others if labels[p] == labels[i]]
        by_hand.append(-sum(z[i] @ z[p] / 0.1 - log_den for p in pos) / len(pos))
    torch.testing.assert_close(supcon_loss(emb, labels, 0.1), torch.stack(by_hand).mean())
    centres = torch.eye(3)[labels] * 5
    tight = supcon_loss(centres + 0.1 * torch.randn(6, 3), labels, 0.1)
    mixed = supcon_loss(torch.randn(6, 3), labels, 0.1)
    assert tight < mixed
    lone = torch.randn(3, 4, requires_grad=True)  # no anchor at all: zero, and differentiable
    loss = supcon_loss(lone, torch.tensor([0, 1, 2]), 0.1)
    loss.backward()
    assert float(loss) == 0.0 and lone.grad is not None


def test_supcon_batches_cost_what_the_pair_rounds_cost():
    labels = [0] * 8 + [1] * 8
    batches = supcon_batches(labels, iterations=3, batch_size=8, seed=0)
    pairs = make_pairs(labels, 3, 0)
    assert len(batches) == -(-len(pairs) // 8)  # as many steps as the pair loss
    assert sum(map(len, batches)) == 2 * len(pairs)  # as many example slots
    flat = [i for b in batches for i in b]
    assert all(flat.count(i) == 12 for i in range(16))  # each example 4x a round
    assert batches == supcon_batches(labels, 3, 8, 0)


def test_supcon_stage_pulls_classes_together_on_digits(tmp_path):
    cfg = digits(tmp_path, "model.strategy=contrastive", "model.strategy_params={contrastive: "
                 "{lr: 3.0e-3, iterations: 10, loss: supcon, temperature: 0.1}}")
    data = load_dataset(cfg.data, with_test=False)
    torch.manual_seed(0)
    built = create_model(cfg.model, data.num_classes)
    before = pair_loss(cfg, built, data.train, CPU)
    losses, _, _ = contrastive_stage(cfg, built, data.train, CPU, **strategy_params(cfg))
    assert pair_loss(cfg, built, data.train, CPU) < 0.8 * before  # the pair criterion too
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("stage", ["loss: supcon", "sampling: unique, schedule: linear, "
                                              "warmup: 0.5"])
def test_pair_stage_runs_resume_exactly(tmp_path, stage):
    def cfg(where, *extra):
        return load_config(CONFIGS / "tiny-digits.yaml", [
            f"train.output_dir={tmp_path / where}", "train.progress=false", "train.epochs=3",
            "model.strategy=contrastive", "model.strategy_params={contrastive: {iterations: 2, "
            f"{stage}, lr: 1.0e-3}}}}", *extra])
    full = fit(cfg("a"))
    with pytest.raises(Interrupt):
        fit(cfg("b"), interrupted_at(8))  # in the second epoch, after the stage
    resumed = fit(cfg("b", "train.resume=true"))
    assert resumed.steps == full.steps
    assert resumed.metrics["test/accuracy"] == pytest.approx(full.metrics["test/accuracy"],
                                                             abs=1e-9)
    assert [r["val/accuracy"] for r in resumed.history] == [r["val/accuracy"] for r in full.history]


def test_contrastive_loss_names_are_checked_up_front(tmp_path):
    with pytest.raises(ConfigError, match=r"model.strategy_params.contrastive.loss: 'supcn' is "
                       r"not allowed \(allowed: cosine, supcon\); did you mean 'supcon'"):
        digits(tmp_path, "model.strategy=contrastive",
               "model.strategy_params.contrastive.loss=supcn")


def test_zero_shot_prior_scales_with_what_the_names_know():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 8 + [1] * 8)
    centres = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    feats = centres[labels] + 0.3 * torch.randn(16, 16)
    good = zero_shot_prior(feats, labels, centres * 3.0)  # names where the classes are
    assert good.norm(dim=-1).min() > 1.0
    torch.testing.assert_close(torch.nn.functional.normalize(good.float(), dim=-1), centres)
    swapped = zero_shot_prior(feats, labels, centres.flip(0))  # names that point the wrong way
    assert float(swapped.abs().max()) == 0.0  # scale 0: the plain probe's zero prior
    # the probe stays at the prior when the L2 dominates, and fits the data when it does not
    w, _ = fit_linear_probe(feats, labels, 2, c=1e-6, prior=good)
    torch.testing.assert_close(w.double(), good, atol=1e-3, rtol=0)
    w, b = fit_linear_probe(feats, labels, 2, prior=swapped)
    assert float(((feats @ w.T + b).argmax(-1) == labels).float().mean()) == 1.0


def test_inference_batches_pad_little_and_keep_the_input_order(tmp_path):
    # float32: the batches' padding must not change an embedding (bf16 rounds differently
    # at other sequence lengths)
    cfg = text(tmp_path, "data.max_length=64", "train.precision=fp32")
    data = load_dataset(cfg.data, with_test=False)
    built = create_model(cfg.model, data.num_classes)
    batcher = Batcher(cfg, built, CPU)
    texts = ["ok", "a much longer sentence that goes on and on about the film", "fine",
             "bad", "another long review which keeps going for quite a few more words", "meh"]
    split = Split(texts, torch.zeros(len(texts), dtype=torch.long))
    batches, restore = inference_batches(texts, 3)
    assert batches == [[0, 3, 5], [2, 1, 4]]  # shortest first (characters), ties in order
    padded = sum(batcher.inputs(split, b)["input_ids"].numel() for b in batches)
    in_order = sum(batcher.inputs(split, list(range(s, s + 3)))["input_ids"].numel()
                   for s in (0, 3))
    assert padded < in_order
    feats = head_inputs(built, batcher, split, 3)
    built.module.eval()
    with swapped_head(built, torch.nn.Identity()):
        one_by_one = torch.cat([built.module(**batcher.inputs(split, [i])) for i in range(6)])
    torch.testing.assert_close(feats, one_by_one, atol=1e-5, rtol=1e-4)
    images = torch.zeros(5, 1, 2, 2)
    assert inference_batches(images, 2)[0] == [[0, 1], [2, 3], [4]]


def test_label_name_anchors_are_one_more_example_per_class(tmp_path):
    cfg = digits(tmp_path)
    data = load_dataset(cfg.data, with_test=False)
    built = create_model(cfg.model, data.num_classes)
    feats = head_inputs(built, Batcher(cfg, built, CPU), data.train, 64)
    names = torch.randn(data.num_classes, feats.shape[1])
    probe_head(cfg, built, data.train, CPU, feats=feats, names=names, label_names="anchors")
    w, b = fit_linear_probe(torch.cat([feats, names]),
                            torch.cat([data.train.labels, torch.arange(data.num_classes)]),
                            data.num_classes)
    torch.testing.assert_close(head_module(built).weight.detach(), w)
    torch.testing.assert_close(head_module(built).bias.detach(), b)


@pytest.mark.parametrize("strategy", ["lp-ft", "contrastive"])
def test_label_names_prior_uses_the_class_names(tmp_path, strategy, monkeypatch):
    import trainers.strategies as strategies

    seen, real = [], strategies.zero_shot_prior
    monkeypatch.setattr(strategies, "zero_shot_prior",  # the real prior, its input recorded
                        lambda feats, labels, names: seen.append(names.shape) or real(
                            feats, labels, names))
    result = fit(text(tmp_path, f"model.strategy={strategy}", "train.epochs=0",
                      "model.strategy_params.contrastive.iterations=1",
                      f"model.strategy_params.{strategy}.label_names=prior"))
    assert seen == [(2, 384)]  # "negative", "positive" through MiniLM
    assert 0.0 <= result.metrics["test/accuracy"] <= 1.0
    with pytest.raises(ConfigError, match=rf"model.strategy_params.{strategy}.label_names="
                       r"anchors: class names are text; data.format=digits has none"):
        digits(tmp_path, f"model.strategy={strategy}", "train.epochs=0",
               f"model.strategy_params.{strategy}.label_names=anchors")


def test_contrastive_runs_under_the_ddp_engine(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        result = fit(digits(tmp_path, "model.strategy=contrastive", "train.engine=ddp",
                            "train.epochs=1", "model.strategy_params.contrastive.iterations=2"))
    finally:
        dist.destroy_process_group()
    assert result.metrics["test/accuracy"] > 0.3


@pytest.mark.parametrize("strategy", ["full", "lp-ft", "contrastive", "contrastive-supcon"])
def test_each_strategy_fits_a_tiny_text_set(tmp_path, strategy):
    loss = "supcon" if strategy.endswith("supcon") else "cosine"
    cfg = text(tmp_path, f"model.strategy={strategy.split('-supcon')[0]}",
               "model.strategy_params.contrastive.iterations=2",
               f"model.strategy_params.contrastive.loss={loss}")
    result = fit(cfg)
    assert result.steps == 1 and 0.0 <= result.metrics["test/accuracy"] <= 1.0


@pytest.mark.slow
def test_text_probe_and_contrastive_stage(tmp_path):
    cfg = text(tmp_path, "model.strategy_params={contrastive: {iterations: 2, lr: 2.0e-4}}")
    data = load_dataset(cfg.data, with_test=False)
    torch.manual_seed(0)
    built = create_model(cfg.model, data.num_classes)
    batcher = Batcher(cfg, built, CPU)
    random_head = train_accuracy(built, batcher, data.train)
    before = pair_loss(cfg, built, data.train, CPU)
    apply_strategy(cfg, built, data.train, CPU)
    assert pair_loss(cfg, built, data.train, CPU) < before
    assert train_accuracy(built, batcher, data.train) >= max(random_head, 0.75)


def test_materialised_augmentation_reaches_the_strategy(tmp_path):
    seen = []

    @register_strategy("record-size")
    def record(cfg, built, train, device):
        seen.append(len(train))

    try:
        cfg = text(tmp_path, "model.strategy=record-size", "train.epochs=0",
                   "augment.policy=eda", "augment.mode=materialised", "augment.copies=2")
        fit(cfg)
    finally:
        STRATEGIES.remove("record-size")
    assert seen == [8 * 3]  # D ∪ T(D): 4 shots x 2 classes, each with 2 transformed copies


def test_normalised_embeddings_have_unit_norm(tmp_path):
    cfg = text(tmp_path, "model.normalize=true")
    data = load_dataset(cfg.data, with_test=False)
    built = create_model(cfg.model, data.num_classes)
    feats = head_inputs(built, Batcher(cfg, built, CPU), data.train, 64)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(data.train)))
    raw = create_model(cfg.model.__class__(**{**vars(cfg.model), "normalize": False}),
                       data.num_classes)
    raw.module.load_state_dict(built.module.state_dict())
    plain = head_inputs(raw, Batcher(cfg, raw, CPU), data.train, 64)
    torch.testing.assert_close(feats, torch.nn.functional.normalize(plain, dim=-1))


def test_strategy_params_are_checked_against_the_strategy_signature(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.strategy_params\.contrastive\.iteratons: "
                       r"unknown parameter of strategy 'contrastive' .*did you mean 'iterations'"):
        digits(tmp_path, "model.strategy=contrastive",
               "model.strategy_params.contrastive.iteratons=3")
    with pytest.raises(ConfigError, match=r"contrastive\.iterations: 0 is out of range"):
        digits(tmp_path, "model.strategy=contrastive",
               "model.strategy_params.contrastive.iterations=0")
    with pytest.raises(ConfigError, match=r"model\.strategy_params: unknown strategy 'contrastve'"):
        digits(tmp_path, "model.strategy_params.contrastve.iterations=3")
    # another strategy's entry is kept but unused: a sweep may switch strategies
    cfg = digits(tmp_path, "model.strategy=lp-ft", "model.strategy_params.contrastive.lr=1e-3")
    assert strategy_params(cfg) == {}
    assert strategy_params(cfg, "contrastive") == {"lr": 1e-3}


def test_pair_stage_can_freeze_the_token_table_and_drop_dropout(tmp_path):
    cfg = text(tmp_path, "model.strategy_params.contrastive.iterations=1")
    data = load_dataset(cfg.data, with_test=False)
    torch.manual_seed(0)
    built = create_model(cfg.model, data.num_classes)
    table = built.module.encoder.get_input_embeddings().weight
    before = {n: p.detach().clone() for n, p in built.module.named_parameters()}
    modes: list[bool] = []
    dropouts = [m for m in built.module.encoder.modules() if isinstance(m, torch.nn.Dropout)]
    hook = dropouts[0].register_forward_hook(lambda m, i, o: modes.append(m.training))
    contrastive_stage(cfg, built, data.train, CPU, iterations=1, freeze_embeddings=True,
                      dropout=False)
    after = dict(built.module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert torch.equal(table.detach(), before["encoder.embeddings.word_embeddings.weight"])
    assert "encoder.embeddings.word_embeddings.weight" not in changed
    assert any(n.startswith("encoder.encoder.layer.") for n in changed)  # the rest learned
    assert table.requires_grad and built.module.training  # both restored for the main loop
    assert modes and not any(modes)  # no dropout mask while it learned
    modes.clear()
    contrastive_stage(cfg, built, data.train, CPU, iterations=1)
    hook.remove()
    assert any(modes) and not torch.equal(table.detach(),
                                          before["encoder.embeddings.word_embeddings.weight"])


def test_freezing_the_token_table_of_an_image_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"contrastive.freeze_embeddings=true: a token table is "
                                          r"a text model's; data.format=digits has none"):
        digits(tmp_path, "model.strategy=contrastive",
               "model.strategy_params.contrastive.freeze_embeddings=true")


def test_pair_stage_batch_size_is_its_own_option(tmp_path):
    def losses(*extra, **kw):
        cfg = text(tmp_path, *extra)
        data = load_dataset(cfg.data, with_test=False)
        torch.manual_seed(0)
        built = create_model(cfg.model, data.num_classes)
        return contrastive_stage(cfg, built, data.train, CPU, iterations=1, **kw)[0]

    own = losses("train.batch_size=8", batch_size=16)
    assert len(own) == 1  # 4 shots x 2 classes x 2 pairs in one step of 16
    assert own == losses("train.batch_size=16")  # what the loop's batch size did alone
    cfg = text(tmp_path, "model.strategy_params.contrastive.batch_size=null")
    assert strategy_params(cfg)["batch_size"] is None  # T | None takes None: the default
    with pytest.raises(ConfigError, match=r"contrastive.batch_size: expected int, got 'x'"):
        text(tmp_path, "model.strategy_params.contrastive.batch_size=x")


def test_pair_stage_has_its_own_lr_schedule(tmp_path):
    def losses(*extra, **kw):
        cfg = text(tmp_path, "train.batch_size=8", *extra)
        data = load_dataset(cfg.data, with_test=False)
        torch.manual_seed(0)
        built = create_model(cfg.model, data.num_classes)
        return contrastive_stage(cfg, built, data.train, CPU, iterations=2, **kw)[0]

    constant = ("optim.schedule=constant", "optim.warmup=0.0")
    own = losses(*constant, schedule="linear", warmup=0.5)
    assert len(own) == 4
    assert own == losses("optim.schedule=linear", "optim.warmup=0.5")  # None: optim's schedule
    flat = losses(*constant)
    assert own[0] == flat[0] and own[1:] != flat[1:]  # the same start, then other step sizes
    with pytest.raises(ConfigError, match=r"contrastive.warmup.*out of range"):
        text(tmp_path, "model.strategy_params.contrastive.warmup=2")
    with pytest.raises(ConfigError, match=r"contrastive.schedule.*'step'"):
        text(tmp_path, "model.strategy_params.contrastive.schedule=step")


def test_pair_stage_options_are_searchable_and_checked_up_front(tmp_path):
    from cluster.space import parse_space

    space = ("tune.space={model.strategy_params.contrastive.freeze_embeddings: 'grid[true, false]',"
             " model.strategy_params.contrastive.sampling: 'grid[anchored, unique]',"
             " model.strategy_params.contrastive.batch_size: 'grid[%s, 16]'}")
    cfg = text(tmp_path, "tune.prefer={}", space % 8)
    dims = parse_space(cfg).dims
    assert dims["model.strategy_params.contrastive.freeze_embeddings"].args == (True, False)
    assert dims["model.strategy_params.contrastive.sampling"].args == ("anchored", "unique")
    assert dims["model.strategy_params.contrastive.batch_size"].args == (8, 16)
    with pytest.raises(ConfigError, match=r"contrastive.batch_size: value 0 of grid\[0, 16\] is "
                                          r"not allowed: 0 is out of range"):
        parse_space(text(tmp_path, "tune.prefer={}", space % 0))
    # pairs are the cosine loss's: an option supcon would silently ignore is refused
    with pytest.raises(ConfigError, match=r"contrastive.sampling=unique: pairs are the cosine "
                                          r"loss's; loss=supcon"):
        text(tmp_path, "model.strategy_params.contrastive.loss=supcon",
             "model.strategy_params.contrastive.sampling=unique")


def test_label_templates_join_the_pair_stage_resume_exactly_and_are_searchable(tmp_path):
    from cluster.space import parse_space
    from trainers.strategies import templated

    cfg = text(tmp_path, "train.epochs=0")
    data = load_dataset(cfg.data, with_test=False)
    train = Split(data.train.inputs, data.train.labels, classes=data.classes)
    staged = templated(train, 2, "It was {}.")
    n, names = len(train), train.classes
    assert staged.inputs[:n] == train.inputs and staged.labels[:n].tolist() == train.labels.tolist()
    assert staged.inputs[n:] == [f"It was {c}." for c in names for _ in range(2)]
    assert staged.labels[n:].tolist() == [c for c in range(len(names)) for _ in range(2)]

    def run(where, *extra, hooks=None):
        return fit(text(tmp_path / where, "train.epochs=3", "train.save_checkpoints=true",
                        "model.strategy_params.contrastive.iterations=2", *extra), hooks)

    plain = run("plain", "model.strategy_params.contrastive.templates=0")
    full = run("full", "model.strategy_params.contrastive.templates=2")
    a, b = (torch.load(r.best_checkpoint / "model.pt", weights_only=True) for r in (plain, full))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the pair stage saw the templates
    with pytest.raises(Interrupt):
        run("cut", "model.strategy_params.contrastive.templates=2", hooks=interrupted_at(2))
    resumed = run("cut", "model.strategy_params.contrastive.templates=2", "train.resume=true")
    assert resumed.steps == full.steps
    assert [r["train/loss"] for r in resumed.history] == [r["train/loss"] for r in full.history]
    assert resumed.metrics["test/accuracy"] == full.metrics["test/accuracy"]

    space = "tune.space={model.strategy_params.contrastive.templates: 'grid[0, 2]'}"
    dims = parse_space(text(tmp_path, "tune.prefer={}", space)).dims
    assert dims["model.strategy_params.contrastive.templates"].args == (0, 2)
    with pytest.raises(ConfigError, match=r"contrastive.template='This is it': needs a \{\}"):
        text(tmp_path, "model.strategy_params.contrastive.template=This is it")
    with pytest.raises(ConfigError, match="templates=2: templates hold class names"):
        digits(tmp_path, "model.strategy_params.contrastive.templates=2")

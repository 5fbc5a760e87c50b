"""Metrics against scikit-learn; the optimizer registry; what L1/L2 do to the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from trainers.config import OptimConfig
from trainers.errors import ConfigError
from trainers.metrics import classification_metrics
from trainers.models import MLP
from trainers.optim import OPTIMIZERS, create_optimizer, create_scheduler, penalty


@pytest.mark.parametrize("seed,classes", [(0, 2), (1, 3), (2, 5), (3, 10)])
def test_metrics_match_sklearn(seed, classes):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, classes, 200))
    m = classification_metrics(y, p, classes, per_class=True)
    labels = list(range(classes))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    kw = dict(labels=labels, average="macro", zero_division=0)
    assert m["precision"] == pytest.approx(skm.precision_score(y, p, **kw))
    assert m["recall"] == pytest.approx(skm.recall_score(y, p, **kw))
    assert m["f1"] == pytest.approx(skm.f1_score(y, p, **kw))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p))
    assert m["f1_per_class"] == pytest.approx(
        skm.f1_score(y, p, labels=labels, average=None, zero_division=0).tolist())
    assert m["confusion"] == skm.confusion_matrix(y, p, labels=labels).tolist()


def test_optimizer_registry_builds_each_and_refuses_unknown():
    model = MLP(4, 8, 3)
    kinds = {"gd": torch.optim.SGD, "sgd": torch.optim.SGD, "momentum": torch.optim.SGD,
             "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    assert set(kinds) <= set(OPTIMIZERS)
    for name, cls in kinds.items():
        opt = create_optimizer(OptimConfig(name=name, lr=0.1, weight_decay=0.01), model)
        assert isinstance(opt, cls)
        decay, no_decay = opt.param_groups
        assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.01
        assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    assert create_optimizer(OptimConfig(name="momentum", nesterov=True), model
                            ).param_groups[0]["nesterov"] is True
    with pytest.raises(ConfigError, match="optim.name: unknown optimizer 'adamm'.*did you mean 'adam'"):
        create_optimizer(OptimConfig(name="adamm"), model)



@pytest.mark.parametrize("name", ["gd", "sgd", "momentum", "adam", "adamw"])
def test_optimizers_take_the_fused_kernel_and_step_like_the_loop(name):
    """The fused update is the per-tensor loop's arithmetic in one kernel: the same weights
    after a few steps; parameters no fused kernel takes (on the meta device) fall back."""
    torch.manual_seed(0)
    nets = [MLP(4, 8, 3), MLP(4, 8, 3)]
    nets[1].load_state_dict(nets[0].state_dict())
    cfg = OptimConfig(name=name, lr=0.05, weight_decay=0.01, momentum=0.9)
    fused, looped = create_optimizer(cfg, nets[0]), create_optimizer(cfg, nets[1])
    assert fused.defaults["fused"] is True
    looped.defaults["fused"] = False
    for g in looped.param_groups:
        g["fused"] = False
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        for net, opt in zip(nets, (fused, looped)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not create_optimizer(cfg, MLP(4, 8, 3).to("meta")).defaults.get("fused")

def test_l1_l2_penalties_add_to_the_loss_and_shrink_weights():
    torch.manual_seed(0)
    model = MLP(4, 8, 3)
    weights = [p for p in model.parameters() if p.ndim > 1]
    l1 = sum(p.abs().sum() for p in weights)
    l2 = sum(p.pow(2).sum() for p in weights)
    assert penalty(model, 0.0, 0.0) is None
    assert float(penalty(model, 0.1, 0.0)) == pytest.approx(float(0.1 * l1), rel=1e-5)
    assert float(penalty(model, 0.0, 0.2)) == pytest.approx(float(0.1 * l2), rel=1e-5)
    # a step on the penalty alone shrinks the weights and leaves biases untouched
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bias_before = model.head.bias.detach().clone()
    norm_before = float(sum(p.abs().sum() for p in weights))
    penalty(model, 0.01, 0.1).backward()
    opt.step()
    assert float(sum(p.abs().sum() for p in weights)) < norm_before
    assert torch.equal(model.head.bias, bias_before)


def test_schedule_warmup_then_decay():
    model = MLP(4, 8, 3)
    cfg = OptimConfig(name="sgd", lr=1.0, warmup=0.2, schedule="linear")
    opt = create_optimizer(cfg, model)
    sched = create_scheduler(cfg, opt, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2]  # warmup
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[-1] < lrs[3]  # decay

"""Optimizers and LR schedules, keyed by name (``create_optimizer(cfg, model)``).

Regularisation, three ways:
- ``weight_decay`` is handed to the torch optimizer. AdamW applies it *decoupled*
  (w <- w - lr*wd*w, outside the adaptive update); SGD, momentum and Adam apply torch's
  coupled form (wd*w added to the gradient), which for Adam is rescaled by the adaptive
  denominator and so regularises large-gradient weights less (Loshchilov & Hutter, 2019).
- ``l2`` adds 0.5*l2*||w||^2 to the loss: coupled L2 for every optimizer, visible in the loss.
- ``l1`` adds l1*||w||_1 to the loss, pushing weights to exactly zero.
Biases and normalisation weights (parameters with one dimension) get neither decay nor penalty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainers.config import OptimConfig
from trainers.errors import ConfigError
from trainers.registry import Registry


@dataclass(frozen=True)
class OptimSpec:
    build: Callable[[list[dict], OptimConfig], torch.optim.Optimizer]
    full_batch: bool = False  # gradient descent uses the whole training set per step


OPTIMIZERS: Registry[OptimSpec] = Registry("optimizer", "optim.name")


def register_optimizer(name: str, full_batch: bool = False):
    def deco(fn):
        OPTIMIZERS.register(name, OptimSpec(fn, full_batch))
        return fn
    return deco


@register_optimizer("gd", full_batch=True)
def _gd(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=c.lr, momentum=0.0, **kernel(groups))


@register_optimizer("sgd")
def _sgd(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=c.lr, momentum=0.0, **kernel(groups))


@register_optimizer("momentum")
def _momentum(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                           **kernel(groups))


@register_optimizer("adam")
def _adam(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, **kernel(groups))


@register_optimizer("adamw")
def _adamw(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, **kernel(groups))


def kernel(groups: list[dict]) -> dict[str, bool]:
    """torch's fused update where every parameter allows it: one kernel over all tensors
    instead of a Python loop per tensor (on CPU, AdamW over MiniLM: 0.25 s -> 0.02 s a step)."""
    params = [p for g in groups for p in g["params"]]
    ok = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if ok else {}


def optimizer_spec(name: str) -> OptimSpec:
    return OPTIMIZERS.get(name)


def decays(name: str, p: torch.Tensor) -> bool:
    """Weights of linear/conv/embedding layers decay; biases and norm weights do not."""
    return p.ndim > 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(n, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def create_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ConfigError("model: no trainable parameters (is model.freeze_backbone hiding the "
                          "head too?)")
    return optimizer_spec(cfg.name).build(groups, cfg)


def penalty(model: nn.Module, l1: float, l2: float) -> torch.Tensor | None:
    """The L1/L2 terms added to the loss (None when both are off)."""
    if not (l1 or l2):
        return None
    total = None
    for n, p in model.named_parameters():
        if not (p.requires_grad and decays(n, p)):
            continue
        term = 0.0
        if l1:
            term = term + l1 * p.abs().sum()
        if l2:
            term = term + 0.5 * l2 * p.pow(2).sum()
        total = term if total is None else total + term
    return total


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at each step: linear warmup, then constant/cosine/linear."""
    warmup = int(round(cfg.warmup * total_steps))
    total = max(total_steps, 1)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return fn


def create_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer,
                     total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

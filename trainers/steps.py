"""One training micro step, shared by ``fit`` and the strategies' own stages (contrastive).

The step's RNGs are reseeded from its position (seed, step, rank) before the batch is built,
so dropout and online augmentation depend on where the step is, not on what ran before: a
run resumed from a checkpoint takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainers.batches import seed_step
from trainers.engines import Engine
from trainers.errors import TrainingError


def train_step(engine: Engine, loss_fn: Callable[[], torch.Tensor], *, seed: int,
               where: str, lr: float, lr_field: str = "optim.lr") -> tuple[float, bool]:
    """Seed, compute ``loss_fn()`` (batch + forward + loss), refuse a non-finite loss,
    backward, step. Returns the loss and whether the optimizer stepped (accumulation)."""
    seed_step(seed, engine.device)
    loss = loss_fn()
    if not torch.isfinite(loss):
        raise TrainingError(f"loss became {loss.item()} {where}: lower {lr_field} (now {lr:g}) "
                            f"or check the data; the run stopped before training on it")
    engine.backward(loss)
    return float(loss.detach()), engine.step()

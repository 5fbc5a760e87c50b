"""From examples to model inputs: the epoch order, per-step seeds, one training micro batch and
the batches of inference.

Shared by ``fit`` and the strategies' own stages, so both shuffle, seed and tokenise alike.
The shuffle of epoch e comes from (seed, e) and the RNG of step s is reseeded from
(seed, s, rank), so a run resumed from any checkpoint takes exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from trainers.config import RunConfig
from trainers.data import Split
from trainers.models import BuiltModel


class Batcher:
    """Turns examples into model inputs on the device: tokenises text, normalises images."""

    def __init__(self, cfg: RunConfig, built: BuiltModel, device: torch.device):
        self.cfg = cfg
        self.tokenizer = built.tokenizer
        self.device = device
        d = cfg.data
        self.mean = torch.tensor(d.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(d.std, device=device).view(1, -1, 1, 1)

    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.cfg.data.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inputs(self, split: Split, idx: list[int]) -> dict[str, torch.Tensor]:
        if isinstance(split.inputs, torch.Tensor):
            x = split.inputs[torch.as_tensor(idx)].to(self.device, non_blocking=True)
            return {"pixels": self.images(x)}
        return self.texts([split.inputs[i] for i in idx])


def inference_batches(inputs: Sequence[Any], batch_size: int
                      ) -> tuple[list[list[int]], torch.Tensor]:
    """Index batches for inference, and the permutation that puts their concatenated outputs
    back in input order.

    Texts go shortest first: a batch pads to its own longest text, so similar lengths side by
    side pad little (half the tokens of input order on SST-2's test split). Images keep their
    order. The order depends on the inputs alone, so every rank runs the same batches."""
    n = len(inputs)
    order = (sorted(range(n), key=lambda i: len(inputs[i])) if n and isinstance(inputs[0], str)
             else list(range(n)))
    restore = torch.empty(n, dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
    return [order[s:s + batch_size] for s in range(0, n, batch_size)], restore


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """The example order of one epoch for one rank: a shared shuffle, strided over ranks."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if world_size > 1:  # pad so every rank takes the same number of steps
        order += order[: (-len(order)) % world_size]
        order = order[rank::world_size]
    return order


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 2_147_483 + step * 7919 + rank * 104_729) % (2 ** 63)


def seed_step(seed: int, device: torch.device) -> None:
    # torch.manual_seed also walks every lazily seeded accelerator (~250 µs a call on a CUDA
    # build without a GPU); seeding only the generators this step uses costs ~5 µs
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def make_train_batch(split: Split, idx: list[int], batcher: Batcher, augment, num_classes: int,
                     seed: int, device: torch.device, targets: torch.Tensor | None = None
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs and targets of one training micro batch, augmented online when asked."""
    targets = (split.labels[torch.as_tensor(idx)] if targets is None else targets).to(device)
    if augment is None:
        return batcher.inputs(split, idx), targets
    gen = torch.Generator(device=device).manual_seed(seed)
    if isinstance(split.inputs, torch.Tensor):
        x = augment.images(split.inputs[torch.as_tensor(idx)].to(device), gen)
        x, targets = augment.mix(x, targets, num_classes, gen)
        return {"pixels": batcher.images(x)}, targets
    texts = augment.texts([split.inputs[i] for i in idx], random.Random(seed))
    inputs = batcher.texts(texts)
    inputs["input_ids"] = augment.tokens(inputs["input_ids"], inputs["attention_mask"], gen,
                                         batcher.tokenizer.mask_token_id)
    return inputs, targets

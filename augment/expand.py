"""The two ways to use a transform T on a training set D.

* online: a fresh random T on every batch of every epoch (``OnlineAugment``, the object the
  training loop calls), plus batch-level mixup/cutmix;
* materialised: D plus ``copies`` fixed transformed copies of every example, computed once and
  reproducible for a seed, with the index of the original each row came from. Expansion comes
  after the few-shot draw and after fold splitting on originals, so a copy is always in the
  same split as its original; ``origin`` lets callers check that.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from augment.image import check_batch, mix_batch
from augment.registry import AugmentError
from augment.text import vocabulary_of


def policy_level(policy: Any, modality: str) -> str:
    """'image', 'words' or 'tokens': a policy without a ``level`` is a plain callable on
    image batches or on lists of texts."""
    return getattr(policy, "level", "image" if modality == "image" else "words")


@dataclass
class OnlineAugment:
    """Per-batch augmentation: each part is None when off, and then passes its input through."""

    image_policy: Any = None  # (x, generator) -> x
    word_policy: Any = None  # (texts, rng, vocabulary=None) -> texts
    token_policy: Any = None  # (input_ids, attention_mask, generator, mask_token_id) -> ids
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @classmethod
    def from_policy(cls, policy: Any, modality: str, **mixing: float) -> OnlineAugment:
        slot = {"image": "image_policy", "words": "word_policy", "tokens": "token_policy"}
        parts = {} if policy is None else {slot[policy_level(policy, modality)]: policy}
        return cls(**parts, **mixing)

    def images(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x if self.image_policy is None else self.image_policy(x, generator)

    def texts(self, texts: list[str], rng: random.Random) -> list[str]:
        return list(texts) if self.word_policy is None else self.word_policy(texts, rng)

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               generator: torch.Generator, mask_token_id: int) -> torch.Tensor:
        if self.token_policy is None:
            return input_ids
        return self.token_policy(input_ids, attention_mask, generator, mask_token_id)

    def mix(self, x: torch.Tensor, targets: torch.Tensor, num_classes: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mix_batch(x, targets, num_classes, generator, mixup_alpha=self.mixup_alpha,
                         cutmix_alpha=self.cutmix_alpha)


def materialise(inputs: torch.Tensor | Sequence[str], labels: torch.Tensor, policy: Any, *,
                copies: int, seed: int, batch_size: int = 256,
                ) -> tuple[torch.Tensor | list[str], torch.Tensor, torch.Tensor]:
    """D ∪ T(D): the originals first, then copy 1 of every example, copy 2, ...

    Returns (inputs, labels, origin) with N * (1 + copies) rows; ``origin[r]`` is the index in
    D of the example row r was made from. Same seed, same rows.
    """
    n = len(labels)
    if len(inputs) != n:
        raise AugmentError("inputs", f"{len(inputs)} inputs for {n} labels")
    if copies < 0:
        raise AugmentError("copies", f"expected >= 0, got {copies}")
    origin = torch.arange(n).repeat(1 + copies)
    labels_out = labels.repeat(1 + copies)
    if isinstance(inputs, torch.Tensor):
        check_batch(inputs)
        if policy_level(policy, "image") != "image":
            raise AugmentError("policy", f"{type(policy).__name__} is not an image policy")
        g =  torch.Generator().manual_seed(seed)
        parts = [inputs]
        for _ in range(copies):
            parts.extend(policy(inputs[i:i + batch_size], g) for i in range(0, n, batch_size))
        return torch.cat(parts), labels_out, origin
    if policy_level(policy, "text") != "words":
        raise AugmentError("mode", f"{type(policy).__name__} works on token ids during training; "
                           f"use augment.mode=online for it")
    texts = list(inputs)
    rng = random.Random(seed)
    vocab = vocabulary_of(texts)  # insertions draw from the whole dataset's words
    out = list(texts)
    for _ in range(copies):
        out.extend(policy(texts, rng, vocab))
    return out, labels_out, origin

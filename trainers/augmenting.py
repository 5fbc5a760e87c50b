"""Bridge between ``AugmentConfig`` and augment/: what the training loop calls on each batch.

The loop only ever sees a ``BatchAugment`` (or None): images arrive as float tensors in [0, 1]
of shape [B, C, H, W] on the training device, texts as lists of strings. Randomness comes from
the generator/rng the loop passes in, so a step is reproducible from (seed, epoch, step).
In materialised mode the policy's copies are made once by ``materialise`` and the per-batch
object only mixes (mixup/cutmix need the batch).
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import torch

from augment import AugmentError, create_augment
from augment.expand import OnlineAugment, policy_level
from augment.expand import materialise as expand_materialise
from trainers.config import AugmentConfig
from trainers.data import FewShotData, Split
from trainers.errors import ConfigError

MODALITIES = ("image", "text")


class BatchAugment(Protocol):
    def images(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...
    def texts(self, texts: list[str], rng: random.Random) -> list[str]: ...
    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               generator: torch.Generator, mask_token_id: int) -> torch.Tensor: ...
    def mix(self, x: torch.Tensor, targets: torch.Tensor, num_classes: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


def _policy(cfg: AugmentConfig, modality: str) -> Any:
    if modality not in MODALITIES:
        raise ConfigError(f"modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    try:
        params = {} if cfg.policy == "none" else cfg.params  # switching off keeps the recipe's params
        return create_augment(cfg.policy, modality=modality, strength=cfg.strength, **params)
    except AugmentError as e:
        raise ConfigError(f"augment.{e}") from None


def build_batch_augment(cfg: AugmentConfig, modality: str) -> BatchAugment | None:
    """The online transform for training batches, or None when augmentation is off."""
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
    if mixing and modality != "image":
        field = "mixup_alpha" if cfg.mixup_alpha > 0 else "cutmix_alpha"
        raise ConfigError(f"augment.{field}: mixup/cutmix mix pixels and apply to images only, "
                          f"not {modality}")
    policy = _policy(cfg, modality)  # validated in both modes, so a typo fails before training
    if cfg.mode == "materialised":
        if policy_level(policy, modality) == "tokens":
            raise ConfigError(f"augment.mode: policy {cfg.policy!r} masks token ids during "
                              f"training; use augment.mode=online")
        policy = None  # the copies already carry T
    elif cfg.policy == "none":
        policy = None
    if policy is None and not mixing:
        return None
    return OnlineAugment.from_policy(policy, modality, mixup_alpha=cfg.mixup_alpha,
                                     cutmix_alpha=cfg.cutmix_alpha)


def materialise(inputs: torch.Tensor | list[str], labels: torch.Tensor, cfg: AugmentConfig,
                modality: str, seed: int) -> tuple[torch.Tensor | list[str], torch.Tensor,
                                                   torch.Tensor]:
    """D ∪ T(D) with ``cfg.copies`` copies: (inputs, labels, origin), N * (1 + copies) rows."""
    policy = _policy(cfg, modality)
    try:
        return expand_materialise(inputs, labels, policy, copies=cfg.copies, seed=seed)
    except AugmentError as e:
        raise ConfigError(f"augment.{e}") from None


def add_rotated_classes(data: FewShotData) -> FewShotData:
    """Every split with its images turned by 90/180/270 degrees as three more sets of classes."""
    from trainers.episodes import rotated_classes

    if data.modality != "image":
        raise ConfigError("augment.rotated_classes: turns images, but the data is "
                          f"{data.modality}")
    classes = data.classes

    def turn(split: Split | None) -> Split | None:
        if split is None:
            return None
        x, y, _, src = rotated_classes(split.inputs, split.labels, classes, split.sources)
        return Split(x, y, src)

    names = rotated_classes(data.train.inputs[:0], data.train.labels[:0], classes)[2]
    return FewShotData(data.modality, names, turn(data.train), turn(data.val), turn(data.test))

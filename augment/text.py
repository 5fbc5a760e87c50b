"""Label-preserving text perturbations that need no downloads.

Word-level policies (deletion, swap, insertion, eda) edit whitespace-separated words, drawing
from the ``random.Random`` passed in; insertion uses in-vocabulary words (the batch's own, or
the dataset's when materialising). Token-level policies (token_cutoff, span_mask) replace
tokenizer ids with the mask id and never touch the first/last real token or padding.
At strength 0 every policy returns its input unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from augment.registry import AugmentError, number, register

WordOp = Callable[[list[str], int, random.Random, Sequence[str]], list[str]]


def vocabulary_of(texts: Sequence[str]) -> list[str]:
    """Sorted distinct words: sorted so the draw does not depend on hash order."""
    return sorted({w for t in texts for w in t.split()})


def _delete(words: list[str], n: int, rng: random.Random, vocab: Sequence[str]) -> list[str]:
    n = min(n, len(words) - 1)  # never delete the whole text
    if n <= 0:
        return words
    drop = set(rng.sample(range(len(words)), n))
    return [w for i, w in enumerate(words) if i not in drop]


def _swap(words: list[str], n: int, rng: random.Random, vocab: Sequence[str]) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(n):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def _insert(words: list[str], n: int, rng: random.Random, vocab: Sequence[str]) -> list[str]:
    words = list(words)
    source = vocab or words
    if not source:
        return words
    for _ in range(n):
        words.insert(rng.randint(0, len(words)), rng.choice(source))
    return words


def _one_of_three(words: list[str], n: int, rng: random.Random,
                  vocab: Sequence[str]) -> list[str]:
    return rng.choice((_delete, _swap, _insert))(words, n, rng, vocab)


@dataclass(frozen=True)
class WordEdit:
    """Apply ``op`` to max(1, round(rate x words)) words of every text."""

    level: ClassVar[str] = "words"
    op: WordOp
    rate: float

    def __call__(self, texts: Sequence[str], rng: random.Random,
                 vocabulary: Sequence[str] | None = None) -> list[str]:
        if self.rate <= 0:
            return list(texts)
        vocab = vocabulary if vocabulary is not None else vocabulary_of(texts)
        out = []
        for text in texts:
            words = text.split()
            n = max(1, round(self.rate * len(words)))
            out.append(" ".join(self.op(words, n, rng, vocab)))
        return out


def _rate(strength: float, rate: float) -> float:
    return number("rate", rate, 0.0, 1.0) * strength


@register("deletion", modality="text")
def deletion(*, strength: float, rate: float = 0.3) -> WordEdit:
    """Delete random words (a fraction `rate` of them at strength 1, at least one)."""
    return WordEdit(_delete, _rate(strength, rate))


@register("swap", modality="text")
def swap(*, strength: float, rate: float = 0.3) -> WordEdit:
    """Swap random pairs of words."""
    return WordEdit(_swap, _rate(strength, rate))


@register("insertion", modality="text")
def insertion(*, strength: float, rate: float = 0.3) -> WordEdit:
    """Insert random in-vocabulary words at random places."""
    return WordEdit(_insert, _rate(strength, rate))


@register("eda", modality="text")
def eda(*, strength: float, rate: float = 0.3) -> WordEdit:
    """One of deletion, swap or insertion per text, chosen at random."""
    return WordEdit(_one_of_three, _rate(strength, rate))


@dataclass(frozen=True)
class IdentityText:
    level: ClassVar[str] = "words"

    def __call__(self, texts: Sequence[str], rng: random.Random,
                 vocabulary: Sequence[str] | None = None) -> list[str]:
        return list(texts)


@register("none", modality="text")
def none(*, strength: float) -> IdentityText:
    """No augmentation."""
    return IdentityText()


# ----------------------------------------------------------------------------------------------
# Token level: acts on tokenizer output


def content_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: real tokens other than the first and last one ([CLS] ... [SEP])."""
    real = attention_mask.bool()
    pos = torch.arange(real.shape[1], device=real.device).expand_as(real)
    first = real.int().argmax(dim=1, keepdim=True)
    last = real.shape[1] - 1 - real.flip(1).int().argmax(dim=1, keepdim=True)
    return real & (pos > first) & (pos < last)


@dataclass(frozen=True)
class TokenMask:
    """Mask max(1, round(rate x content tokens)) tokens per row: scattered (cutoff) or one
    contiguous span (span)."""

    level: ClassVar[str] = "tokens"
    rate: float
    span: bool

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 generator: torch.Generator, mask_token_id: int) -> torch.Tensor:
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise AugmentError("inputs", f"input_ids {tuple(input_ids.shape)} and attention_mask "
                               f"{tuple(attention_mask.shape)} must both be [B, L]")
        if self.rate <= 0:
            return input_ids
        content = content_positions(attention_mask)
        count = content.sum(dim=1, keepdim=True)
        k = (count.double() * self.rate).round().clamp(min=1).long().minimum(count)
        b, length = input_ids.shape
        u = torch.rand(b, length, generator=generator, device=generator.device).to(content.device)
        if self.span:
            # the span starts at a uniformly drawn content position that leaves room for it
            first = content.int().argmax(dim=1, keepdim=True)  # first content position
            start = first + (u[:, :1] * (count - k + 1).double()).long().clamp(min=0)
            pos = torch.arange(length, device=content.device).expand(b, length)
            chosen = (pos >= start) & (pos < start + k)
        else:
            # the k content positions with the smallest random keys
            keys = torch.where(content, u, 2.0)
            rank = keys.argsort(dim=1).argsort(dim=1)
            chosen = rank < k
        chosen &= content
        return torch.where(chosen.to(input_ids.device),
                           torch.as_tensor(mask_token_id, dtype=input_ids.dtype,
                                           device=input_ids.device), input_ids)


@register("token_cutoff", modality="text")
def token_cutoff(*, strength: float, rate: float = 0.3) -> TokenMask:
    """Replace random tokens by the mask token (tokenizer level, online only)."""
    return TokenMask(_rate(strength, rate), span=False)


@register("span_mask", modality="text")
def span_mask(*, strength: float, rate: float = 0.3) -> TokenMask:
    """Replace one contiguous span of tokens by the mask token (tokenizer level, online only)."""
    return TokenMask(_rate(strength, rate), span=True)

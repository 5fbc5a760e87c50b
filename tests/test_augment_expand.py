"""Materialised D ∪ T(D): size, originals kept, determinism, and no leakage across folds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from augment import create_augment
from augment.expand import materialise as expand_materialise
from augment.text import vocabulary_of
from trainers.augmenting import materialise
from trainers.config import AugmentConfig
from trainers.data import stratified_folds
from trainers.errors import ConfigError

N, CLASSES = 12, 3


def smooth_images(n: int = N, seed: int = 0) -> torch.Tensor:
    """Distinct low-frequency images: a mild warp keeps each closest to its own original."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(24, 24), mode="bilinear", align_corners=False)


LABELS = torch.arange(N) % CLASSES
TEXTS = [f"example {i} " + " ".join(f"w{i}_{j}" for j in range(8)) for i in range(N)]
IMAGE_CFG = AugmentConfig(policy="classic", strength=0.5, mode="materialised", copies=3,
                          params={"rotation": 10, "shift": 0.05, "flip": False, "fill": "border"})
TEXT_CFG = AugmentConfig(policy="eda", strength=0.5, mode="materialised", copies=2)


def test_images_materialise_to_n_times_one_plus_copies():
    x = smooth_images()
    xs, ys, origin = materialise(x, LABELS, IMAGE_CFG, "image", seed=0)
    assert xs.shape == (N * 4, *x.shape[1:]) and ys.shape == (N * 4,) and ys.dtype == torch.long
    assert torch.equal(xs[:N], x)  # originals first, unchanged
    assert torch.equal(origin, torch.arange(N).repeat(4))
    assert torch.equal(ys, LABELS[origin])
    assert all(not torch.equal(xs[r], x[origin[r]]) for r in range(N, 4 * N))
    again = materialise(x, LABELS, IMAGE_CFG, "image", seed=0)[0]
    assert torch.equal(xs, again)
    assert not torch.equal(xs, materialise(x, LABELS, IMAGE_CFG, "image", seed=1)[0])


def test_texts_materialise_with_labels_kept():
    xs, ys, origin = materialise(TEXTS, LABELS, TEXT_CFG, "text", seed=0)
    assert len(xs) == len(ys) == len(origin) == N * 3
    assert xs[:N] == TEXTS and torch.equal(ys, LABELS[origin])
    assert all(xs[r] != TEXTS[int(origin[r])] for r in range(N, 3 * N))
    assert xs == materialise(TEXTS, LABELS, TEXT_CFG, "text", seed=0)[0]


def test_zero_copies_is_the_originals():
    xs, ys, origin = materialise(TEXTS, LABELS, AugmentConfig(policy="swap", copies=0), "text", 0)
    assert xs == TEXTS and torch.equal(origin, torch.arange(N))


def _nearest_original_images(xs: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(xs.flatten(1), originals.flatten(1))
    return d.argmin(1)


def _nearest_original_texts(xs: list[str], originals: list[str]) -> torch.Tensor:
    def overlap(a: str, b: str) -> float:
        sa, sb = set(a.split()), set(b.split())
        return len(sa & sb) / len(sa | sb)
    return torch.tensor([max(range(len(originals)), key=lambda j: overlap(x, originals[j]))
                         for x in xs])


@pytest.mark.parametrize("modality", ["image", "text"])
def test_origin_keeps_every_copy_in_its_originals_fold(modality: str):
    if modality == "image":
        originals, cfg = smooth_images(), IMAGE_CFG
        nearest = _nearest_original_images
    else:
        originals, cfg = TEXTS, TEXT_CFG
        nearest = _nearest_original_texts
    xs, ys, origin = materialise(originals, LABELS, cfg, modality, seed=0)
    # origin is truthful: every row is closest to the original it claims to come from
    assert torch.equal(nearest(xs, originals), origin)
    folds = stratified_folds(LABELS.tolist(), 3, seed=0)  # split on originals, before expansion
    fold_of = torch.empty(N, dtype=torch.long)
    for f, members in enumerate(folds):
        fold_of[members] = f
    for f, members in enumerate(folds):
        held_out = set(members)
        train_rows = [r for r in range(len(ys)) if fold_of[origin[r]] != f]
        assert not {int(origin[r]) for r in train_rows} & held_out
        assert len(train_rows) == (N - len(held_out)) * (1 + cfg.copies)
        # every copy of a held-out original is itself held out
        held_rows = [r for r in range(len(ys)) if int(origin[r]) in held_out]
        assert {int(fold_of[origin[r]]) for r in held_rows} == {f}


def test_text_insertions_draw_from_the_whole_dataset():
    policy = create_augment("insertion", modality="text", strength=1.0)
    xs, _, origin = expand_materialise(TEXTS, LABELS, policy, copies=1, seed=0)
    borrowed = [w for r in range(N, 2 * N) for w in xs[r].split()
                if w not in TEXTS[int(origin[r])].split()]
    vocab = {w for t in TEXTS for w in t.split()}
    assert borrowed and set(borrowed) <= vocab


def test_materialise_rejects_token_policies_and_mismatched_inputs():
    with pytest.raises(ConfigError, match=r"augment\.mode: .*augment\.mode=online"):
        materialise(TEXTS, LABELS, AugmentConfig(policy="token_cutoff"), "text", 0)
    with pytest.raises(ConfigError, match=r"augment\.inputs: 11 inputs for 12 labels"):
        materialise(TEXTS[:-1], LABELS, TEXT_CFG, "text", 0)
    with pytest.raises(ConfigError, match=r"augment\.policy: 'classic' is for image data"):
        materialise(TEXTS, LABELS, AugmentConfig(policy="classic"), "text", 0)


def test_insertion_vocabulary_does_not_depend_on_hash_order():
    # string hashing is salted per process: drawing from a set's order would change the copies
    texts = ["b a c", "c d a", "e"]
    assert vocabulary_of(texts) == ["a", "b", "c", "d", "e"]
    assert vocabulary_of(list(reversed(texts))) == vocabulary_of(texts)

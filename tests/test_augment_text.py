"""Text policies: word-level edits on strings, token-level masking on tokenizer ids."""

from __future__ import annotations

import random

import pytest
import torch

from augment import available, create_augment
from augment.text import content_positions

WORD_POLICIES = ["deletion", "swap", "insertion", "eda"]
TOKEN_POLICIES = ["token_cutoff", "span_mask"]
TEXTS = [
    "a stirring , funny and finally transporting re-imagining of beauty and the beast",
    "apparently reassembled from the cutting-room floor of any given daytime soap .",
    "undoubtedly the scariest movie ever made about tattoos .",
    "bad movie",
]


def test_text_policies_are_registered():
    assert set(WORD_POLICIES + TOKEN_POLICIES + ["none"]) == set(available("text"))


@pytest.mark.parametrize("name", WORD_POLICIES)
def test_word_policy_changes_every_text_and_is_seeded(name: str):
    policy = create_augment(name, modality="text", strength=0.5)
    out = policy(TEXTS, random.Random(0))
    assert len(out) == len(TEXTS)
    assert all(o != t for o, t in zip(out, TEXTS))
    assert out == policy(TEXTS, random.Random(0))
    assert out != policy(TEXTS, random.Random(1))


@pytest.mark.parametrize("name", WORD_POLICIES + ["none"])
def test_word_policy_at_strength_zero_changes_nothing(name: str):
    texts = TEXTS + ["  odd   spacing stays  "]
    assert create_augment(name, modality="text", strength=0.0)(texts, random.Random(0)) == texts


def test_word_policies_only_use_words_of_the_data():
    vocab = {w for t in TEXTS for w in t.split()}
    for name in WORD_POLICIES:
        out = create_augment(name, modality="text", strength=1.0)(TEXTS, random.Random(0))
        assert {w for t in out for w in t.split()} <= vocab, name


def test_deletion_swap_insertion_do_what_they_say():
    rng = random.Random(0)
    words = [t.split() for t in TEXTS]
    deleted = create_augment("deletion", modality="text", strength=1.0)(TEXTS, rng)
    swapped = create_augment("swap", modality="text", strength=1.0)(TEXTS, rng)
    inserted = create_augment("insertion", modality="text", strength=1.0)(TEXTS, rng)
    for w, d, s, i in zip(words, deleted, swapped, inserted):
        d, s, i = d.split(), s.split(), i.split()
        assert 1 <= len(d) < len(w) and all(x in w for x in d)
        assert sorted(s) == sorted(w) and s != w
        assert len(i) > len(w)
    assert create_augment("deletion", modality="text", strength=1.0)(["one"], rng) == ["one"]


# ----------------------------------------------------------------------------------------------
# token level

MASK = 103


def ids_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding, left padding, a row with no content and a full-length row."""
    ids = torch.tensor([
        [101, 11, 12, 13, 14, 15, 102, 0, 0, 0],
        [0, 0, 101, 21, 22, 23, 24, 25, 26, 102],
        [101, 102, 0, 0, 0, 0, 0, 0, 0, 0],
        [101, 31, 32, 33, 34, 35, 36, 37, 38, 102],
    ])
    return ids, (ids != 0).long()


def test_content_positions_exclude_specials_and_padding():
    ids, mask = ids_batch()
    content = content_positions(mask)
    expected = (ids != 0) & (ids != 101) & (ids != 102)
    assert torch.equal(content, expected)


@pytest.mark.parametrize("name", TOKEN_POLICIES)
def test_token_policies_never_touch_specials_or_padding(name: str):
    ids, mask = ids_batch()
    content = content_positions(mask)
    policy = create_augment(name, modality="text", strength=1.0, rate=0.5)
    for seed in range(20):
        out = policy(ids, mask, torch.Generator().manual_seed(seed), MASK)
        assert out.shape == ids.shape and out.dtype == ids.dtype
        assert torch.equal(out[~content], ids[~content])
        changed = out != ids
        assert (out[changed] == MASK).all()
        counts = changed.sum(1).tolist()
        assert counts == [2, 3, 0, 4]  # round(0.5 x content), at least 1 where there is content


def test_span_mask_is_contiguous_and_cutoff_is_not_always():
    ids, mask = ids_batch()
    span = create_augment("span_mask", modality="text", strength=1.0, rate=0.5)
    cutoff = create_augment("token_cutoff", modality="text", strength=1.0, rate=0.5)
    gaps = []
    for seed in range(20):
        for policy, is_span in ((span, True), (cutoff, False)):
            out = policy(ids, mask, torch.Generator().manual_seed(seed), MASK)
            pos = (out[3] != ids[3]).nonzero().flatten()
            contiguous = int(pos[-1] - pos[0]) + 1 == len(pos)
            if is_span:
                assert contiguous
            else:
                gaps.append(not contiguous)
    assert any(gaps)


@pytest.mark.parametrize("name", TOKEN_POLICIES)
def test_token_policies_are_seeded_and_off_at_strength_zero(name: str):
    ids, mask = ids_batch()
    policy = create_augment(name, modality="text", strength=0.7)
    a = policy(ids, mask, torch.Generator().manual_seed(0), MASK)
    assert torch.equal(a, policy(ids, mask, torch.Generator().manual_seed(0), MASK))
    assert any(not torch.equal(a, policy(ids, mask, torch.Generator().manual_seed(s), MASK))
               for s in range(1, 5))
    off = create_augment(name, modality="text", strength=0.0)
    assert torch.equal(off(ids, mask, torch.Generator().manual_seed(0), MASK), ids)

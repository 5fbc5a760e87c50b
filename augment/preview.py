"""Pictures of what an augmentation does (``launch.py augment-preview`` draws them).

Images: a PNG grid, one row per example, the original then 3 augmented versions (the policy,
then mixup/cutmix when the recipe turns them on). Text: a markdown table of the original and
3 variants; token-level policies are shown on whitespace tokens framed by [CLS] ... [SEP].
``augment`` is an ``augment.expand.OnlineAugment`` (or None: the originals repeated).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

VARIANTS = 3


def one_per_class(labels: list[int], n: int) -> list[int]:
    """Up to n indices, cycling over the classes so the preview shows several of them."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    queues = [list(reversed(v)) for _, v in sorted(by_class.items())]
    picks: list[int] = []
    while len(picks) < min(n, len(labels)):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop())
    return picks


def image_grid(images: Any, labels: Any, classes: list[str], augment: Any, title: str,
               seed: int, out: Path) -> None:
    """One row per image: the original, then VARIANTS augmented draws (policy, then mixing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    x, y = images, labels
    g = torch.Generator().manual_seed(seed)
    columns = [x]
    for _ in range(VARIANTS):
        v = x if augment is None else augment.images(x, g)
        if augment is not None:
            v, _ = augment.mix(v, y, len(classes), g)
        columns.append(v)
    fig, axes = plt.subplots(len(y), 1 + VARIANTS, squeeze=False,
                             figsize=(1.6 * (1 + VARIANTS), 1.6 * len(y)))
    for r in range(len(y)):
        for c, col in enumerate(columns):
            img = col[r].permute(1, 2, 0).clamp(0, 1).numpy()
            ax = axes[r][c]
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"{title} #{c}", fontsize=8)
        axes[r][0].set_ylabel(classes[int(y[r])], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def text_table(texts: list[str], labels: list[int], classes: list[str], augment: Any,
               title: str, seed: int, out: Path) -> None:
    """A markdown table: label, original text, then VARIANTS augmented versions."""
    import torch

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    if augment is None:
        variants = [list(texts)] * VARIANTS
    elif augment.token_policy is not None:
        variants = [_mask_words(texts, augment, g) for _ in range(VARIANTS)]
    else:
        variants = [augment.texts(texts, rng) for _ in range(VARIANTS)]
    head = ["label", "original"] + [f"{title} #{k + 1}" for k in range(VARIANTS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, y in enumerate(labels):
        cells = [classes[int(y)], texts[r]] + [v[r] for v in variants]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mask_words(texts: list[str], augment: Any, g: Any) -> list[str]:
    """Token-level policies on whitespace tokens (ids index a per-call word list)."""
    import torch

    rows = [["[CLS]", *t.split(), "[SEP]"] for t in texts]
    width = max(len(r) for r in rows)
    vocab = ["[PAD]", "[MASK]"] + sorted({w for r in rows for w in r})
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([[index[w] for w in r] + [0] * (width - len(r)) for r in rows])
    masked = augment.tokens(ids, (ids != 0).long(), g, 1)
    return [" ".join(vocab[int(t)] for t in row[1:len(r) - 1]) for row, r in zip(masked, rows)]

"""``launch.py augment-preview``: look at what a recipe's augmentation does before training.

Images: a PNG grid, one row per example, the original then 3 augmented versions (the policy,
then mixup/cutmix when the recipe turns them on). Text: a markdown table of the original and
3 variants; token-level policies are shown on whitespace tokens framed by [CLS] ... [SEP].
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path
from typing import Any

VARIANTS = 3


def add_augment_preview_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (its data and augment sections are used)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. augment.strength=1")
    parser.add_argument("--out", required=True,
                        help="output file: a PNG grid for images, a markdown table for text "
                             "(a .png name becomes .md for text)")
    parser.add_argument("--n", type=int, default=8, help="examples to show (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentation draws")


def run_augment_preview(args: argparse.Namespace) -> int:
    from trainers.augmenting import build_batch_augment
    from trainers.config import load_config
    from trainers.data import load_dataset
    from trainers.errors import ConfigError

    if args.n < 1:
        raise ConfigError(f"--n: expected at least 1 example, got {args.n}")
    cfg = load_config(args.recipe, args.overrides)
    data = load_dataset(cfg.data)
    # preview the transform itself even when the run materialises its copies
    aug_cfg = dataclasses.replace(cfg.augment, mode="online")
    augment = build_batch_augment(aug_cfg, data.modality)
    picks = _one_per_class(data.train.labels.tolist(), args.n)
    mixing = [name for name, alpha in (("mixup", aug_cfg.mixup_alpha),
                                       ("cutmix", aug_cfg.cutmix_alpha)) if alpha > 0]
    title = "+".join([aug_cfg.policy] + mixing)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if data.modality == "image":
        _image_grid(data, picks, augment, title, args.seed, out)
    else:
        if out.suffix.lower() in (".png", ".jpg", ".jpeg"):
            out = out.with_suffix(".md")
        _text_table(data, picks, augment, title, args.seed, out)
    print(f"wrote {out}")
    return 0


def _one_per_class(labels: list[int], n: int) -> list[int]:
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


def _image_grid(data: Any, picks: list[int], augment: Any, title: str, seed: int,
                out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    x = data.train.inputs[picks]
    y = data.train.labels[picks]
    g = torch.Generator().manual_seed(seed)
    columns = [x]
    for _ in range(VARIANTS):
        v = x if augment is None else augment.images(x, g)
        if augment is not None:
            v, _ = augment.mix(v, y, data.num_classes, g)
        columns.append(v)
    fig, axes = plt.subplots(len(picks), 1 + VARIANTS, squeeze=False,
                             figsize=(1.6 * (1 + VARIANTS), 1.6 * len(picks)))
    for r, idx in enumerate(picks):
        for c, col in enumerate(columns):
            img = col[r].permute(1, 2, 0).clamp(0, 1).numpy()
            ax = axes[r][c]
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"{title} #{c}", fontsize=8)
        axes[r][0].set_ylabel(data.classes[int(y[r])], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _text_table(data: Any, picks: list[int], augment: Any, title: str, seed: int,
                out: Path) -> None:
    import torch

    texts = [data.train.inputs[i] for i in picks]
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
    for r, i in enumerate(picks):
        cells = [data.classes[int(data.train.labels[i])], texts[r]] + [v[r] for v in variants]
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

"""``launch.py augment-preview``: look at what a recipe's augmentation does before training."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from commands.common import add_recipe_args


def add_augment_preview_args(parser: argparse.ArgumentParser) -> None:
    add_recipe_args(parser, "YAML recipe (its data and augment sections are used)",
                    "dotted overrides, e.g. augment.strength=1")
    parser.add_argument("--out", required=True,
                        help="output file: a PNG grid for images, a markdown table for text "
                             "(a .png name becomes .md for text)")
    parser.add_argument("--n", type=int, default=8, help="examples to show (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentation draws")


def run_augment_preview(args: argparse.Namespace) -> int:
    from augment.preview import image_grid, one_per_class, text_table
    from trainers.augmenting import build_batch_augment
    from trainers.data import load_dataset
    from trainers.errors import ConfigError
    from trainers.recipe import load_config

    if args.n < 1:
        raise ConfigError(f"--n: expected at least 1 example, got {args.n}")
    cfg = load_config(args.recipe, args.overrides)
    data = load_dataset(cfg.data)
    # preview the transform itself even when the run materialises its copies
    aug_cfg = dataclasses.replace(cfg.augment, mode="online")
    augment = build_batch_augment(aug_cfg, data.modality)
    picks = one_per_class(data.train.labels.tolist(), args.n)
    mixing = [name for name, alpha in (("mixup", aug_cfg.mixup_alpha),
                                       ("cutmix", aug_cfg.cutmix_alpha)) if alpha > 0]
    title = "+".join([aug_cfg.policy] + mixing)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = data.train.labels[picks]
    if data.modality == "image":
        image_grid(data.train.inputs[picks], labels, data.classes, augment, title, args.seed, out)
    else:
        if out.suffix.lower() in (".png", ".jpg", ".jpeg"):
            out = out.with_suffix(".md")
        text_table([data.train.inputs[i] for i in picks], labels.tolist(), data.classes, augment,
                   title, args.seed, out)
    print(f"wrote {out}")
    return 0

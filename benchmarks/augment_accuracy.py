"""Does augmentation help few-shot transfer? Omniglot, K=5 per character, 20 characters.

The CIFAR-10 ResNet-20 is fine-tuned on 5 drawings of each of 20 Omniglot characters and tested
on the other 15; augmentation off vs the classic policy vs RandAugment, over few-shot seeds.

    python -m benchmarks.augment_accuracy [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import fmt, markdown_table, mean_std, run_seeds, write_results

RECIPE = "configs/omniglot-resnet20.yaml"
VARIANTS = {
    "none": ["augment.policy=none", "augment.params={}"],
    "classic": ["augment.policy=classic"],
    "randaugment": ["augment.policy=randaugment", "augment.params={}"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 10 epochs")
    args = ap.parse_args()
    seeds = 2 if args.quick else args.seeds
    extra = ["train.epochs=10"] if args.quick else []
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for name, overrides in VARIANTS.items():
            results[name] = run_seeds(RECIPE, overrides + extra, seeds, out)
    rows = [[name, fmt(v), str(len(v))] for name, v in results.items()]
    md = ("# Augmentation on few-shot transfer (Omniglot, 20-way, K=5, ResNet-20 from CIFAR-10)\n\n"
          + markdown_table(["augmentation", "test accuracy % (mean ± std)", "seeds"], rows))
    path = write_results("augment_accuracy", {
        "recipe": RECIPE, "variants": VARIANTS, "extra_overrides": extra,
        "per_seed": results,
        "summary": {k: dict(zip(("mean", "std"), mean_std(v))) for k, v in results.items()}}, md)
    print(md)
    print(f"written {path}")


if __name__ == "__main__":
    main()

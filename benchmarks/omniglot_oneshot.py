"""Omniglot one-shot: the 20 official 20-way 1-shot runs (Lake et al. 2015), error rate.

Each run has 20 support drawings (one per character) and 20 query drawings; the error is the
share of queries matched to the wrong character, averaged over the 20 runs (the repo's
protocol). Methods:

- pixels-nn: nearest neighbour on raw 105x105 pixels (ink = 1), Euclidean distance.
- <resnet>-frozen: the CIFAR-10 ResNet from ../shared/weights as a frozen feature extractor
  (images resized to 32x32), nearest centroid by cosine similarity (1-shot: the support image).
- <resnet>-finetuned: the same network fine-tuned on the 20 support images by our loop
  (``fit`` with the data given directly): lp-ft strategy (head = logistic-regression probe on
  the frozen features, then end-to-end), classic augmentation (rotation, shift, zoom).
  The recipe was fixed beforehand, not tuned on these runs (they are the test set).

    python -m benchmarks.omniglot_oneshot [--quick] [--models cifar_resnet20 cifar_resnet56]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, mean_std, write_results

PROJECT = Path(__file__).resolve().parent.parent
RUNS = PROJECT.parent / "shared" / "data" / "images" / "omniglot" / "one_shot_runs"
RECIPE = PROJECT / "configs" / "omniglot-resnet20.yaml"
ANCHORS = {  # published 20-way one-shot error rates, for context
    "Modified Hausdorff Distance (Omniglot repo demo)": 38.8,
    "Siamese convnets (Koch et al. 2015)": 8.0,
    "Humans (Lake et al. 2015)": 4.5,
}
FINETUNE = ["model.strategy=lp-ft", "optim.name=adam", "optim.lr=3e-4", "optim.schedule=cosine",
            "optim.warmup=0.0", "train.batch_size=20", "augment.policy=classic",
            "augment.params={rotation: 15, shift: 0.1, zoom: 0.1, flip: false, fill: border}"]


def load_png(path: Path, size: int | None) -> torch.Tensor:
    """[1, H, W] float in [0, 1], white background (as stored)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        if size is not None:
            im = im.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).unsqueeze(0)


def load_run(run: Path, size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support images (label = index), query images and their labels, from class_labels.txt."""
    support_files = sorted((run / "training").glob("*.png"))
    index = {p.name: i for i, p in enumerate(support_files)}
    queries, labels = [], []
    for line in (run / "class_labels.txt").read_text().split("\n"):
        if not line.strip():
            continue
        query, support = line.split()
        queries.append(load_png(RUNS / query, size))
        labels.append(index[Path(support).name])
    support = torch.stack([load_png(p, size) for p in support_files])
    return support, torch.stack(queries), torch.tensor(labels)


def nearest(support: torch.Tensor, query: torch.Tensor, cosine: bool) -> torch.Tensor:
    s, q = support.flatten(1), query.flatten(1)
    if cosine:
        return (F.normalize(q, dim=1) @ F.normalize(s, dim=1).T).argmax(1)
    return torch.cdist(q, s).argmin(1)


# --------------------------------------------------------------------------------------------
# Methods: name -> (run folder, context) -> error % on the run's 20 queries

Method = Callable[[Path, dict[str, Any]], float]


def error_pct(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((pred != labels).float().mean())


def pixels_nn(run: Path, ctx: dict[str, Any]) -> float:
    support, query, labels = load_run(run, None)
    return error_pct(nearest(1 - support, 1 - query, cosine=False), labels)


def recipe(model: str, out: str, extra: list[str] = ()) -> Any:
    from trainers.recipe import load_config

    return load_config(RECIPE, [f"model.name={model}", f"train.output_dir={out}",
                                "train.progress=false", "train.save_checkpoints=false",
                                "train.num_threads=2", *extra])


def frozen(model: str) -> Method:
    def run_method(run: Path, ctx: dict[str, Any]) -> float:
        from trainers.models import create_model

        cfg = recipe(model, ctx["out"])
        support, query, labels = load_run(run, cfg.data.image_size)
        built = ctx.setdefault(f"built-{model}", create_model(cfg.model, 10))
        net = built.module.eval()
        mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
        std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
        with torch.no_grad():
            feats = [net.features((x.expand(-1, 3, -1, -1) - mean) / std)
                     for x in (support, query)]
        return error_pct(nearest(feats[0], feats[1], cosine=True), labels)
    return run_method


def finetuned(model: str) -> Method:
    def run_method(run: Path, ctx: dict[str, Any]) -> float:
        from trainers.data import FewShotData, Split
        from trainers.loop import fit

        cfg = recipe(model, ctx["out"], FINETUNE + [f"train.run_name={run.name}-{model}",
                                                    f"train.epochs={ctx['epochs']}"])
        support, query, labels = load_run(run, cfg.data.image_size)
        classes = [f"class{i + 1:02d}" for i in range(len(support))]
        data = FewShotData("image", classes, Split(support.expand(-1, 3, -1, -1).contiguous(),
                                                   torch.arange(len(support))),
                           None, Split(query.expand(-1, 3, -1, -1).contiguous(), labels))
        return 100.0 * (1.0 - fit(cfg, data=data).metrics["test/accuracy"])
    return run_method


def methods_for(models: list[str], finetune: list[str]) -> dict[str, Method]:
    out: dict[str, Method] = {"pixels-nn": pixels_nn}
    for m in models:
        out[f"{m.replace('cifar_', '')}-frozen-cosine"] = frozen(m)
    for m in finetune:
        out[f"{m.replace('cifar_', '')}-finetuned-lpft-aug"] = finetuned(m)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 runs, ResNet-20 only")
    ap.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    ap.add_argument("--finetune-models", nargs="*", default=["cifar_resnet20"],
                    help="models also fine-tuned (20 fits each: the slow part)")
    ap.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (1 step each)")
    args = ap.parse_args(argv)
    runs = sorted(p for p in RUNS.glob("run*") if p.is_dir())
    if not runs:
        raise SystemExit(f"{RUNS}: no one-shot runs found (../shared is needed)")
    if args.quick:
        runs, args.models, args.finetune_models = runs[:5], ["cifar_resnet20"], ["cifar_resnet20"]
    torch.manual_seed(0)
    errors: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        ctx: dict[str, Any] = {"out": out, "epochs": args.epochs}
        for name, method in methods_for(args.models, args.finetune_models).items():
            t0 = time.perf_counter()
            errors[name] = []
            for run in runs:
                errors[name].append(method(run, ctx))
            seconds[name] = round(time.perf_counter() - t0, 1)
            print(f"{name}: {statistics.fmean(errors[name]):.1f} % error over {len(runs)} runs "
                  f"({seconds[name]:.0f} s)", flush=True)
    rows = [[name, f"{mean_std(v)[0]:.1f} ± {mean_std(v)[1]:.1f}", str(len(v)),
             f"{seconds[name]:.0f}"] for name, v in errors.items()]
    rows += [[f"*{k}* (published)", f"{v:.1f}", "20", "—"] for k, v in ANCHORS.items()]
    md = ("# Omniglot 20-way one-shot (the 20 official runs)\n\n"
          f"Error rate % (mean ± std over runs), {len(runs)} runs{' (--quick)' if args.quick else ''}"
          f". Fine-tuning recipe: {RECIPE.name} + `{' '.join(FINETUNE)}`, "
          f"train.epochs={args.epochs}; fixed in advance, not tuned on these runs.\n\n"
          + markdown_table(["method", "error % (mean ± std)", "runs", "seconds"], rows))
    payload = {"runs": [r.name for r in runs], "per_run_error_pct": errors, "seconds": seconds,
               "summary": {k: dict(zip(("mean", "std"), mean_std(v))) for k, v in errors.items()},
               "anchors_pct": ANCHORS, "finetune_overrides": FINETUNE, "epochs": args.epochs}
    path = write_results("omniglot_oneshot_quick" if args.quick else "omniglot_oneshot",
                         payload, md)
    print(md)
    print(f"written {path}")
    return payload


if __name__ == "__main__":
    main()

"""Self-training on unlabelled examples (``selftrain.*`` on ``data.unlabeled``).

After the strategy has prepared the model, the probe head (multinomial logistic regression on
the embeddings the head receives, as lp-ft fits it) labels the unlabelled examples. Each round
the most confident of every predicted class - the same number for each class - join the
labelled examples and the probe is refitted on both; round r keeps r x per_class per class.
The head becomes the last probe, and the fine-tuning epochs train on the labelled examples plus
the last round's pseudo-labelled ones. With ``selftrain.pair_rounds``, the body learns from them
as well: that many more rounds of the strategy's pair stage on both, then the probe on both
(without it, only the probe sees the pseudo-labels, and the embeddings stay as prepared).

Why class-balanced: a probe fitted on 8 examples per class often leans to one class, and an
unlabelled pool is often skewed (amazon_cf_en is mostly one class); taking the top of each
predicted class keeps both out of the pseudo-labels. The smallest class limits every class.

The choice is a function of the prepared weights and the data, the same on every rank. It is
written to the run folder (pseudo_labels.json) so that a resumed run, which no longer has the
prepared weights, trains on exactly the same split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainers import io
from trainers.batches import Batcher
from trainers.config import RunConfig
from trainers.data import Split
from trainers.errors import CheckpointError, DataError
from trainers.models import BuiltModel
from trainers.strategies import (
    build_strategy,
    fit_linear_probe,
    head_inputs,
    head_module,
    set_head,
    with_rounds,
)

RECORD = "pseudo_labels.json"


def balanced_picks(confidence: torch.Tensor, predicted: torch.Tensor, num_classes: int,
                   per_class: int, threshold: float) -> torch.Tensor:
    """Indices of the ``per_class`` most confident examples of every predicted class (fewer,
    the same for each class, when a class has fewer at or above ``threshold``)."""
    ranked = []
    for c in range(num_classes):
        idx = torch.nonzero((predicted == c) & (confidence >= threshold)).flatten()
        ranked.append(idx[torch.argsort(confidence[idx], descending=True, stable=True)])
    k = min([per_class] + [len(r) for r in ranked])
    return torch.sort(torch.cat([r[:k] for r in ranked])).values


def pseudo_label(cfg: RunConfig, built: BuiltModel, train: Split, unlabeled: Split,
                 device: torch.device) -> dict[str, Any]:
    """Run the rounds, set the head to the last probe; the picks, their labels, per-round log."""
    s = cfg.selftrain
    batcher = Batcher(cfg, built, device)
    built.module.to(device)
    feats = head_inputs(built, batcher, train, cfg.train.eval_batch_size)
    pool = head_inputs(built, batcher, unlabeled, cfg.train.eval_batch_size)
    num_classes = head_module(built).out_features
    w, b = fit_linear_probe(feats, train.labels, num_classes)
    picks, labels, rounds = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), []
    for r in range(1, s.rounds + 1):
        confidence, predicted = torch.softmax(pool.double() @ w.double().T + b.double(), -1).max(1)
        picks = balanced_picks(confidence, predicted, num_classes, r * s.per_class, s.threshold)
        labels = predicted[picks]
        w, b = fit_linear_probe(torch.cat([feats, pool[picks]]),
                                torch.cat([train.labels, labels]), num_classes)
        rounds.append({"round": r, "pseudo_labels": len(picks),
                       "mean_confidence": round(float(confidence[picks].mean()), 4)
                       if len(picks) else None,
                       "per_class": torch.bincount(labels, minlength=num_classes).tolist()})
    set_head(head_module(built), w, b)
    return {"indices": picks.tolist(), "labels": labels.tolist(), "rounds": rounds,
            "sources": [unlabeled.sources[i] for i in picks.tolist()] if unlabeled.sources else []}


def join(train: Split, unlabeled: Split, indices: list[int], labels: list[int]) -> Split:
    """``train`` followed by the picked unlabelled examples with their pseudo-labels."""
    extra = unlabeled.take(indices)
    if isinstance(train.inputs, torch.Tensor):
        inputs: Any = torch.cat([train.inputs, extra.inputs])
    else:
        inputs = list(train.inputs) + list(extra.inputs)
    sources = list(train.sources) + list(extra.sources) if train.sources else []
    return Split(inputs, torch.cat([train.labels, torch.as_tensor(labels, dtype=torch.long)]),
                 sources, train.classes)


def self_train(cfg: RunConfig, built: BuiltModel, train: Split, unlabeled: Split | None,
               device: torch.device, run_dir: Path, *, fresh: bool, rank: int) -> Split:
    """The split fit trains on: pseudo-labelled now (``fresh``) or as the run recorded it."""
    if unlabeled is None or not len(unlabeled):
        raise DataError(f"selftrain.rounds={cfg.selftrain.rounds}: data.unlabeled="
                        f"{cfg.data.unlabeled!r} gave no unlabelled examples")
    path = Path(run_dir) / RECORD
    if fresh:
        record = pseudo_label(cfg, built, train, unlabeled, device)
        if rank == 0:
            io.write_json(path, record)
            last = record["rounds"][-1]
            print(f"self-training: {len(record['indices'])} pseudo-labels of {len(unlabeled)} "
                  f"unlabelled after {len(record['rounds'])} round(s) (per class "
                  f"{last['per_class']}, mean confidence {last['mean_confidence']})", flush=True)
    elif path.is_file():
        record = io.read_json(path)
    else:
        raise CheckpointError(f"{path}: missing; the run was self-trained, and resuming needs the "
                              f"pseudo-labels it chose (start afresh without train.resume)")
    joined = join(train, unlabeled, record["indices"], record["labels"])
    again = with_rounds(cfg, cfg.selftrain.pair_rounds, "selftrain.pair_rounds")
    if fresh and again is not None and record["indices"]:  # resumed: the checkpoint has it
        build_strategy(again).prepare(again, built, joined, device)
    return joined

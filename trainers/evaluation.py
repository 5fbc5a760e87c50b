"""Evaluate a trained model on labelled data: the training metrics, per class, and a confusion PNG.

The metric code is trainers.metrics, the same that scores val/ and test/ during training, and
labelled files are read with the training readers (same column options, same label rules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.data import IMAGE_SUFFIXES, TEXT_SUFFIXES, image_classes, read_text_file, split_file
from trainers.errors import DataError
from trainers.metrics import classification_metrics
from trainers.predictor import Predictor, load_images


def read_labelled(path: str | Path, predictor: Predictor, *, text_column: str | None = None,
                  label_column: str | None = None
                  ) -> tuple[list[str] | torch.Tensor, np.ndarray, list[str]]:
    """(inputs, label indices, names) from a labelled file or a dataset folder.

    Text: a TSV/CSV/JSONL file, or a folder holding <test_split>.tsv|.csv|.jsonl. Images: a
    folder of class folders (named as in training), or a dataset root with <test_split>/.
    """
    src = predictor.source
    d = src.cfg.data
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    num = len(predictor.classes)
    if src.modality == "text":
        if p.is_dir():
            found = split_file(p, d.test_split or "test")
            if found is None:
                raise DataError(f"{p}: no {d.test_split or 'test'}{'|'.join(TEXT_SUFFIXES)} in "
                                f"this folder; give a labelled file")
            p = found
        elif p.suffix.lower() not in TEXT_SUFFIXES:
            raise DataError(f"{p}: model {src.folder} takes text: give a labelled "
                            f"{'/'.join(TEXT_SUFFIXES)} file or a dataset folder")
        texts, labels, ids, _ = read_text_file(p, text_column or d.text_column,
                                               label_column or d.label_column, None,
                                               hint="pass --text-column/--label-column")
        if not texts:
            raise DataError(f"{p}: no rows to evaluate on")
        bad = next((i for i, y in enumerate(labels) if y >= num), None)
        if bad is not None:
            raise DataError(f"{ids[bad]}: label {labels[bad]} out of range for this model's "
                            f"{num} classes (0..{num - 1})")
        return texts, np.asarray(labels), ids
    if p.is_file():
        raise DataError(f"{p}: model {src.folder} takes images: give a folder of class folders "
                        f"({', '.join(predictor.classes[:3])}, ...)")
    root = p / d.test_split if d.test_split and (p / d.test_split).is_dir() else p
    found = image_classes(root, d.class_depth)
    unknown = sorted(set(found) - set(predictor.classes))
    if not found or unknown:
        raise DataError(f"{root}: class folder(s) {unknown[:3] or '(none)'} are not classes of "
                        f"this model (classes: {', '.join(predictor.classes[:5])}"
                        f"{', ...' if num > 5 else ''})")
    files, labels = [], []
    for name, folder in sorted(found.items()):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(predictor.classes.index(name))
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return load_images(files, src.cfg), np.asarray(labels), [str(f) for f in files]


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(2.5 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 20:
        top = cm.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_model(predictor: Predictor, data: str | Path, out_dir: str | Path, *,
                   batch_size: int = 64, progress: bool = True, text_column: str | None = None,
                   label_column: str | None = None) -> dict[str, Any]:
    """Metrics of the model on ``data``; writes metrics.json and confusion.png to ``out_dir``."""
    inputs, labels, _ = read_labelled(data, predictor, text_column=text_column,
                                      label_column=label_column)
    probs = predictor.predict(inputs, batch_size=batch_size, progress=progress)
    pred = probs.argmax(-1)
    m = classification_metrics(labels, pred, len(predictor.classes), per_class=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(predictor.source.folder), "data": str(data), "examples": len(labels),
              "classes": predictor.classes, **m}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    plot_confusion(np.asarray(m["confusion"]), predictor.classes, out / "confusion.png",
                   f"{Path(str(data)).name}: accuracy {m['accuracy']:.3f}, "
                   f"macro-F1 {m['f1']:.3f}")
    return result


def metrics_table(result: dict[str, Any]) -> str:
    """Markdown: the overall metrics, then precision/recall/F1/support per class."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {result[k]:.4f} |" for k in ("accuracy", "f1", "precision", "recall",
                                                     "mcc")]
    cm = np.asarray(result["confusion"])
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for i, c in enumerate(result["classes"]):
        lines.append(f"| {c} | {result['precision_per_class'][i]:.4f} | "
                     f"{result['recall_per_class'][i]:.4f} | {result['f1_per_class'][i]:.4f} | "
                     f"{int(cm[i].sum())} |")
    return "\n".join(lines)

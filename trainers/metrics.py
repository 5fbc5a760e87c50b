"""Classification metrics from a confusion matrix: accuracy, precision, recall, F1, MCC."""

from __future__ import annotations

import math
import statistics

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """cm[i, j] = examples of true class i predicted as j."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b != 0)


def mcc(cm: np.ndarray) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004)."""
    cm = cm.astype(np.float64)
    s = cm.sum()
    c = np.trace(cm)
    t = cm.sum(axis=1)  # true counts
    p = cm.sum(axis=0)  # predicted counts
    num = c * s - t @ p
    den = math.sqrt(s * s - p @ p) * math.sqrt(s * s - t @ t)
    return float(num / den) if den else 0.0


def classification_metrics(y_true, y_pred, num_classes: int,
                           per_class: bool = False) -> dict[str, float | list[float]]:
    """Accuracy, macro precision/recall/F1 and MCC (zero where a class has no predictions)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_div(tp, cm.sum(axis=0).astype(np.float64))
    recall = _safe_div(tp, cm.sum(axis=1).astype(np.float64))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    out: dict[str, float | list[float]] = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "mcc": mcc(cm),
    }
    if per_class:
        out.update(precision_per_class=precision.tolist(), recall_per_class=recall.tolist(),
                   f1_per_class=f1.tolist(), confusion=cm.tolist())
    return out


# --------------------------------------------------------------------------------------------
# Summaries over repeats (seeds, folds) and the rows reported to Ray

STD_KIND = "sample std (n-1)"  # what every "mean ± std" in smallshot's output means


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; 0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def numeric(row: dict) -> dict[str, float]:
    """The numbers of a metrics row (what Ray's report() takes)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def final_row(metrics: dict, monitor: str) -> dict[str, float]:
    """The last report of a run: its final metrics, with ``monitor`` set to the best value
    seen, so Tune and Train rank the run by its best (kept) checkpoint, not its last."""
    row = numeric(metrics)
    best = metrics.get(f"best_{monitor}")
    if best is not None:
        row[monitor] = best
    return row

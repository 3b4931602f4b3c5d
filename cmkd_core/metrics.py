"""Classification metrics on class-index arrays (numpy, no framework)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``(C, C)``: row = true class, column = predicted class; inputs ``(N,)`` ints."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of ``y_pred (N,)`` equal to ``y_true (N,)``."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over classes of F1; a class never true nor predicted scores 0."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """``{"accuracy", "macro_f1", "n"}`` for predictions ``(N,)``."""
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
        "n": len(y_true),
    }


def seen_unseen(y_true: np.ndarray, y_pred: np.ndarray, unseen: Sequence[int]) -> dict:
    """Generalised zero-shot accuracy (Xian et al. 2018) for predictions ``(N,)`` over every
    class: accuracy on the samples of the labelled classes, on those of the classes in
    ``unseen`` (no label in training), and their harmonic mean ``H`` (0 when either is 0)."""
    hidden = np.isin(y_true, np.asarray(list(unseen)))
    seen_acc = accuracy(y_true[~hidden], y_pred[~hidden]) if (~hidden).any() else 0.0
    unseen_acc = accuracy(y_true[hidden], y_pred[hidden]) if hidden.any() else 0.0
    total = seen_acc + unseen_acc
    return {
        "accuracy_labelled_classes": seen_acc,
        "accuracy_unlabelled_classes": unseen_acc,
        "h": 2 * seen_acc * unseen_acc / total if total > 0 else 0.0,
    }

"""Whether a teacher's class geometry can help a student: the class-similarity diagnostic.

Without pairs, what a teacher can tell a student beyond its labels is which classes resemble
each other (docs/results.md, DESIGN section 6). That can carry over only where the two
modalities agree on it. The diagnostic compares the teacher's class-similarity matrix (cosine
between class means of the bank) with the student's (cosine between class means of a CE-only
student's features): the Pearson correlation of their off-diagonal entries, and a permutation
p-value (Mantel test: the student's classes relabelled at random, rows and columns together).
Near 0 (digits and spoken digits, about +0.04): no semantics to transfer; well above 0 with a
small p (fashion images and their descriptions): some.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cmkd_core.bank import TeacherBank
from cmkd_core.data.contract import SPLITS


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature of each class ``(num_classes, d)``, in the dtype of ``features`` ``(N, d)``;
    ``labels`` ``(N,)`` int64. A class without samples gets a zero row."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    return sums / counts.clamp_min(1)[:, None]


def class_similarity(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Cosine similarity between class means.

    ``features`` ``(N, d)``, ``labels`` ``(N,)`` int64 in ``[0, num_classes)``; returns a
    ``(num_classes, num_classes)`` float64 array (a class without samples gives a zero row and
    column)."""
    means = F.normalize(class_means(features.double(), labels, num_classes), dim=1)
    return (means @ means.T).numpy()


def _upper(matrix: np.ndarray) -> np.ndarray:
    rows, cols = np.triu_indices(matrix.shape[-1], k=1)
    return matrix[..., rows, cols]


def similarity_correlation(
    teacher: np.ndarray, student: np.ndarray, permutations: int = 10000, seed: int = 0
) -> dict[str, float | int]:
    """Pearson correlation of the off-diagonal entries of two ``(C, C)`` similarity matrices
    and its one-sided permutation p-value (how often relabelling the student's classes at
    random gives a correlation at least as high). Returns ``correlation``, ``p_value`` and
    ``permutations``. Needs ``C >= 3``."""
    num = teacher.shape[0]
    if teacher.shape != (num, num) or student.shape != (num, num) or num < 3:
        shapes = f"{teacher.shape} and {student.shape}"
        raise ValueError(f"need two (C, C) matrices with C >= 3, got {shapes}")
    a = _upper(teacher)
    observed = float(np.corrcoef(a, _upper(student))[0, 1])
    rng = np.random.default_rng(seed)
    orders = np.argsort(rng.random((permutations, num)), axis=1)
    shuffled = student[orders[:, :, None], orders[:, None, :]]  # (P, C, C)
    b = _upper(shuffled)
    a_c = a - a.mean()
    b_c = b - b.mean(1, keepdims=True)
    r = (b_c @ a_c) / (np.linalg.norm(b_c, axis=1) * np.linalg.norm(a_c) + 1e-300)
    p_value = (1 + int((r >= observed - 1e-12).sum())) / (1 + permutations)
    return {"correlation": observed, "p_value": p_value, "permutations": permutations}


def describe_bank(bank: TeacherBank) -> dict:
    """What ``cmkd bank inspect`` prints: classes, rows per split and class, feature size, the
    teacher head's accuracy on the bank's own val rows, and each class's most similar class in
    the teacher's space (cosine of the train rows' class means)."""
    val = bank.split("val")
    with torch.no_grad():
        predicted = bank.head()(bank.features[val]).argmax(1)
    counts = {
        split: {
            c: int(((bank.labels == i) & bank.split(split)).sum())
            for i, c in enumerate(bank.classes)
        }
        for split in SPLITS
    }
    train = bank.split("train")
    similarity = class_similarity(bank.features[train], bank.labels[train], len(bank.classes))
    np.fill_diagonal(similarity, -np.inf)
    nearest = {
        c: [bank.classes[int(similarity[i].argmax())], float(similarity[i].max())]
        for i, c in enumerate(bank.classes)
    }
    return {
        "classes": list(bank.classes),
        "rows": len(bank.labels),
        "feature_dim": int(bank.features.shape[1]),
        "counts": counts,
        "nearest_class": nearest,
        "val_accuracy": float((predicted == bank.labels[val]).float().mean())
        if val.any()
        else None,
        "info": bank.info,
    }

"""Measure alignment rather than only optimise it: the paper's two quantities, and a 2-D view.

Both compare class by class the teacher bank's train rows with a student's features projected
into the teacher's space (the student's ``projector``), on the student's validation split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cmkd_core.align.feature import feature_alignment
from cmkd_core.align.similarity import class_similarity, similarity_correlation
from cmkd_core.bank import TeacherBank
from cmkd_core.data.contract import ModalityDataset
from cmkd_core.data.tensors import samples_of
from cmkd_core.models import Classifier


@torch.no_grad()
def split_features(
    model: Classifier, dataset: ModalityDataset, classes, split: str = "val", project: bool = False
):
    """Student features of ``split`` ``(N, d_S)`` (with ``project``, projected into the
    teacher's space: ``(N, d_T)``) and their labels ``(N,)``."""
    model = model.cpu().eval()
    samples = samples_of(dataset, dataset.rows(split), classes)
    chunks = []
    for index in samples.batches(512):
        features = model.features(*samples.take(index)[0])
        chunks.append(model.projector(features) if project else features)
    return torch.cat(chunks), samples.labels


def projected_features(model: Classifier, dataset: ModalityDataset, classes, split: str = "val"):
    """Student features of ``split`` projected into the teacher's space ``(N, d_T)`` and their
    labels ``(N,)``."""
    return split_features(model, dataset, classes, split, project=True)


@torch.no_grad()
def alignment(
    model: Classifier, bank: TeacherBank, dataset: ModalityDataset, cap: int = 200
) -> dict:
    """The paper's two quantities on the validation split, averaged over classes.

    ``fa_distance``: entropic OT (cosine cost) between the class-``c`` student features, projected
    into the teacher's space, and the class-``c`` bank train rows. ``la_distance``: total
    variation between the mean teacher-head prediction on those two sets. Lower is closer.
    """
    features, labels = projected_features(model, dataset, bank.classes)
    head = bank.head()
    train = bank.split("train")
    fa, la = [], []
    for c in range(len(bank.classes)):
        student = features[labels == c][:cap]
        teacher = bank.features[train & (bank.labels == c)][:cap]
        if len(student) < 2 or len(teacher) < 2:
            continue
        fa.append(float(feature_alignment(student, teacher, "cosine", 0.1, 200)))
        p, q = F.softmax(head(teacher), 1).mean(0), F.softmax(head(student), 1).mean(0)
        la.append(float(0.5 * (p - q).abs().sum()))
    return {"fa_distance": float(np.mean(fa)), "la_distance": float(np.mean(la))}


def pca_2d(*clouds: torch.Tensor) -> list[np.ndarray]:
    """Project point clouds ``(n_i, d)`` onto the top two principal axes of all of them
    together (one shared frame); returns arrays ``(n_i, 2)``."""
    joined = torch.cat(clouds).double()
    centred = joined - joined.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    flat = (centred @ v[:2].T).float().numpy()
    out, start = [], 0
    for cloud in clouds:
        out.append(flat[start : start + len(cloud)])
        start += len(cloud)
    return out


@torch.no_grad()
def class_geometry(
    model: Classifier, bank: TeacherBank, dataset: ModalityDataset, split: str = "val"
) -> dict:
    """The class-similarity diagnostic (:mod:`cmkd_core.align.similarity`) for ``model`` (a
    CE-only student, so that nothing of the teacher is in it) against ``bank``: the teacher's
    similarities from the bank's train rows, the student's from its own features (before the
    projector) on ``split``. Returns ``correlation``, ``p_value``, ``permutations``."""
    features, labels = split_features(model, dataset, bank.classes, split)
    num = len(bank.classes)
    train = bank.split("train")
    teacher = class_similarity(bank.features[train], bank.labels[train], num)
    student = class_similarity(features, labels, num)
    return similarity_correlation(teacher, student)

"""End-to-end recipes for one modality dataset: fit a teacher, fit a student.

They choose nothing the params do not say: the model comes from the registry, inputs are
standardised with train-split statistics only, selection is on the val split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmkd_core.bank import TeacherBank
from cmkd_core.config import DistillParams, TeacherParams
from cmkd_core.data.contract import ModalityDataset
from cmkd_core.data.tensors import Samples, samples_of, training_frames
from cmkd_core.distill.objective import objective_for
from cmkd_core.distill.train import TrainResult, TrainSettings, seed_everything, train_classifier
from cmkd_core.models import Classifier
from cmkd_core.models.checkpoint import build_classifier


@dataclass
class Fitted:
    """A trained classifier, the spec that rebuilds it, and its training record."""

    model: Classifier
    spec: dict
    result: TrainResult


def split_samples(
    dataset: ModalityDataset,
    classes: tuple[str, ...],
    device: torch.device,
    labelled_only: bool = False,
) -> dict[str, Samples]:
    """``{"train", "val", "test"}`` samples on ``device``; ``labelled_only`` restricts train to
    the ids in ``labelled.csv``."""
    return {
        split: samples_of(
            dataset, dataset.rows(split, labelled_only and split == "train"), classes
        ).to(device)
        for split in ("train", "val", "test")
    }


def _fit(
    spec: dict,
    objective,
    train: Samples,
    val: Samples,
    settings: TrainSettings,
    device: torch.device,
    bank: TeacherBank | None,
    desc: str,
) -> Fitted:
    seed_everything(settings.seed)
    model = build_classifier(spec)
    model.encoder.norm.fit(training_frames(train.to("cpu")))
    model.to(device)
    result = train_classifier(model, objective, train, val, settings, bank=bank, desc=desc)
    return Fitted(model, spec, result)


def fit_teacher(
    dataset: ModalityDataset, params: TeacherParams, device: torch.device, progress: bool = True
) -> tuple[Fitted, dict[str, Samples]]:
    """Train the teacher with cross-entropy on its train split, selected on val."""
    classes = dataset.meta.classes
    data = split_samples(dataset, classes, device)
    spec = {
        "model": params.model,
        "sample_shape": list(dataset.meta.sample_shape),
        "feature_dim": params.feature_dim,
        "num_classes": len(classes),
        "align_dim": None,
    }
    objective = objective_for("ce", DistillParams(label_smoothing=params.label_smoothing))
    settings = TrainSettings(
        params.epochs,
        params.batch_size,
        params.lr,
        params.weight_decay,
        params.warmup_epochs,
        params.seed,
        None,
        progress,
    )
    fitted = _fit(spec, objective, data["train"], data["val"], settings, device, None, "teacher")
    return fitted, data


def fit_student(
    dataset: ModalityDataset,
    bank: TeacherBank,
    params: DistillParams,
    method: str,
    device: torch.device,
    progress: bool = True,
) -> tuple[Fitted, dict[str, Samples]]:
    """Train a student with ``method`` on the labelled train samples, selected on val.

    The student's class indices follow the bank's class list.
    """
    data = split_samples(dataset, bank.classes, device, labelled_only=True)
    spec = {
        "model": params.model,
        "sample_shape": list(dataset.meta.sample_shape),
        "feature_dim": params.feature_dim,
        "num_classes": len(bank.classes),
        "align_dim": int(bank.features.shape[1]),
    }
    head = bank.head().to(device)
    objective = objective_for(method, params, head)
    settings = TrainSettings(
        params.epochs,
        params.batch_size,
        params.lr,
        params.weight_decay,
        params.warmup_epochs,
        params.seed,
        params.grad_clip,
        progress,
    )
    fitted = _fit(spec, objective, data["train"], data["val"], settings, device, bank, method)
    return fitted, data

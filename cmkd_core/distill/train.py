"""Recipes around the one loop: train a classifier (teacher or student), extract a bank."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cmkd_core.bank import TeacherBank
from cmkd_core.data.contract import SPLITS, ModalityDataset
from cmkd_core.data.tensors import Samples, samples_of
from cmkd_core.distill.batches import BatchSource
from cmkd_core.distill.loop import BestCheckpoint, Callback, ProgressBar, fit, warmup_cosine
from cmkd_core.distill.methods import Method
from cmkd_core.distill.resume import ResumeCheckpoint
from cmkd_core.models import Classifier


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; on the CPU the whole run is then deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and schedule of one training run (AdamW, warm-up then cosine)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    seed: int
    grad_clip: float | None = None
    progress: bool = True
    unlabelled_batch_size: int = 64
    checkpoint: str | None = None
    """Where to save the training state each epoch and resume from (None: no checkpoints)."""
    checkpoint_key: str = ""
    """Identifies the run's settings and data; a checkpoint with another key is not resumed."""
    amp: bool = False
    """bf16 autocast of the loss terms (feature alignment's OT stays float32)."""
    min_steps: int = 0
    """Optimiser steps at least: ``max(epochs * batches per pass, min_steps)`` steps are run
    in ``epochs`` equal rounds (an evaluation after each)."""


@dataclass(frozen=True)
class ClassPrior:
    """A selection signal that reads no label, for runs where some classes have none: how far
    the classes the model predicts on ``pool`` (unlabelled train samples) are from the
    teacher bank's class ``proportions`` ``(C,)`` (total variation, 0 to 1)."""

    pool: Samples
    proportions: torch.Tensor


def prior_fit(model: Classifier, prior: ClassPrior) -> dict[str, float]:
    """``val_prior_tv``: the total variation between the predicted class shares on the pool and
    the prior; ``val_pool_classes``: how many classes the model predicts there at all."""
    predicted = predict_logits(model, prior.pool).argmax(1).cpu()
    share = torch.bincount(predicted, minlength=len(prior.proportions)).float() / len(predicted)
    tv = 0.5 * float((share - prior.proportions.cpu().float()).abs().sum())
    return {"val_prior_tv": tv, "val_pool_classes": float(len(torch.unique(predicted)))}


@dataclass
class TrainResult:
    """Per-epoch records and the selected (best validation accuracy) epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    full_validation: dict[str, float] | None = None
    """When each round saw a subset of validation: the selected round's student on all of it
    (``best_val_accuracy`` is then its accuracy, or score)."""

    @property
    def best_record(self) -> dict[str, float]:
        """The history's record of the selected epoch (``{}`` before any)."""
        return next((r for r in self.history if r["epoch"] == self.best_epoch), {})


@torch.no_grad()
def _in_batches(call, model: Classifier, samples: Samples, batch_size: int) -> torch.Tensor:
    """``call(*inputs)`` over ``samples`` batch by batch with ``model`` in eval mode, joined
    along the first dimension; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    out = []
    for index in samples.batches(batch_size):
        inputs, _ = samples.take(index)
        out.append(call(*inputs))
    model.train(was_training)
    return torch.cat(out)


def predict_logits(model: Classifier, samples: Samples, batch_size: int = 512) -> torch.Tensor:
    """Logits ``(N, C)`` of ``model`` on ``samples``, in eval mode, batch by batch."""
    return _in_batches(model, model, samples, batch_size)


def predict_features(model: Classifier, samples: Samples, batch_size: int = 512) -> torch.Tensor:
    """Encoder features ``(N, d)`` of ``model`` on ``samples``, in eval mode."""
    return _in_batches(model.features, model, samples, batch_size)


def validation_record(
    model: Classifier, val: Samples, prior: ClassPrior | None = None
) -> dict[str, float]:
    """``val_accuracy`` and ``val_loss`` of ``model`` on ``val``; with a ``prior``, also
    :func:`prior_fit`'s signals and ``val_score`` (the accuracy minus the prior's distance)."""
    logits = predict_logits(model, val)
    record = {
        "val_accuracy": float((logits.argmax(1) == val.labels).float().mean()),
        "val_loss": float(F.cross_entropy(logits, val.labels)),
    }
    if prior is not None:
        record.update(prior_fit(model, prior))
        record["val_score"] = record["val_accuracy"] - record["val_prior_tv"]
    return record


def train_classifier(
    model: Classifier,
    method: Method,
    batches: BatchSource,
    val: Samples,
    settings: TrainSettings,
    *,
    desc: str = "train",
    callbacks: Sequence[Callback] = (),
    prior: ClassPrior | None = None,
) -> TrainResult:
    """Train ``model`` with ``method`` on the rounds of ``batches`` (built with the same
    ``settings``), select on ``val`` accuracy; with a ``prior`` (some classes have no label, and
    ``val`` holds only samples of the others), on ``val_score``: that accuracy minus the
    prior's total variation (:func:`prior_fit`).

    ``callbacks`` run after each round, after the built-in ones (the best-epoch keeper, the
    resume checkpoint with ``settings.checkpoint``, the progress bar). The model ends at the
    weights of its best validation epoch; tensors must be on the model's device.
    """
    device = next(model.parameters()).device
    method.to(device)
    per_round, generator = batches.per_round, batches.generator

    def validate() -> dict[str, float]:
        return validation_record(model, val, prior)

    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(settings.epochs * per_round, settings.warmup_epochs * per_round),
    )
    best = BestCheckpoint("val_accuracy" if prior is None else "val_score")
    extra_callbacks, callbacks = callbacks, [best]
    start, done = 1, []
    if settings.checkpoint is not None:
        resume = ResumeCheckpoint(
            settings.checkpoint,
            settings.checkpoint_key,
            model=model,
            method=method,
            optimizer=optimizer,
            scheduler=scheduler,
            generator=generator,
            best=best,
        )
        start, done = resume.restore()
        callbacks.append(resume)
    bar = ProgressBar(settings.epochs, desc, disable=not settings.progress, initial=start - 1)
    callbacks += [bar, *extra_callbacks]  # after the checkpoint: they see a saved epoch
    history = fit(
        model,
        lambda batch: method(model, batch),
        batches,
        validate,
        epochs=settings.epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        grad_clip=settings.grad_clip,
        callbacks=callbacks,
        start_epoch=start,
        history=done,
        amp=settings.amp,
    )
    return TrainResult(history, best.best_epoch, best.best_value)


def accuracy_of(model: Classifier, samples: Samples) -> float:
    """Share of ``samples`` whose predicted class equals their label."""
    return float((predict_logits(model, samples).argmax(1) == samples.labels).float().mean())


def extract_bank(
    teacher: Classifier, dataset: ModalityDataset, info: dict, device: torch.device | str = "cpu"
) -> TeacherBank:
    """Run the teacher once over every sample of its ``dataset`` (manifest order) and keep what
    distillation needs: features, labels, split codes, ids and the head's weights."""
    manifest = dataset.manifest
    samples = samples_of(dataset, manifest).to(device)
    features = predict_features(teacher, samples).cpu()
    return TeacherBank(
        features=features,
        labels=samples.labels.cpu(),
        splits=torch.tensor([SPLITS.index(s) for s in manifest["split"]]),
        head_weight=teacher.head.weight.detach().cpu().clone(),
        head_bias=teacher.head.bias.detach().cpu().clone(),
        classes=tuple(dataset.meta.classes),
        info=info,
        ids=tuple(manifest["id"]),
    )

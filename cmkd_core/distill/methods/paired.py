"""Baselines that need instance pairs: each batch's teacher rows are the paired samples.

They refuse to run on unpaired data (:class:`MethodError` at the start of training).
``hinton_kd`` and ``fitnet`` take their teacher term over every paired student train sample,
labelled or not: a pair needs no label for the teacher to speak to it. ``c2kd`` stays on the
labelled batch (its non-target KD is defined by the label).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmkd_core.bank import TeacherBank
from cmkd_core.distill.methods.base import Batch, FAWeighted, KDMethod, kd_divergence
from cmkd_core.distill.methods.registry import register_method
from cmkd_core.models import Classifier

Terms = dict[str, tuple[float, torch.Tensor]]


@register_method("hinton_kd")
class HintonKD(KDMethod):
    """CE + w_kd * T^2 KL(teacher || student) on the paired teacher's logits."""

    needs_pairs = True
    uses_unlabelled = True

    def extra(self, model: Classifier, batch: Batch, features, logits) -> Terms:
        teacher_logits = self.teacher_head(batch.teacher_features)
        if batch.unlabelled is not None and batch.unlabelled_teacher is not None:
            logits = torch.cat([logits, model(*batch.unlabelled)])
            teacher_logits = torch.cat(
                [teacher_logits, self.teacher_head(batch.unlabelled_teacher)]
            )
        return {"kd": (self.w_kd, kd_divergence(teacher_logits, logits, self.kd_temperature))}


@register_method("fitnet")
class FitNet(FAWeighted):
    """CE + w_fa * mean squared error between projected student and paired teacher features."""

    needs_pairs = True
    uses_unlabelled = True

    def extra(self, model: Classifier, batch: Batch, features, logits) -> Terms:
        teacher = batch.teacher_features
        if batch.unlabelled is not None and batch.unlabelled_teacher is not None:
            features = torch.cat([features, model.features(*batch.unlabelled)])
            teacher = torch.cat([teacher, batch.unlabelled_teacher])
        hint = F.mse_loss(model.projector(features), teacher)
        return {"hint": (self.w_fa, hint)}


def non_target_kd(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, t: float
) -> torch.Tensor:
    """KD restricted to the non-target classes (both distributions renormalised without the
    label's class); inputs ``(B, C)`` logits and ``(B,)`` labels."""
    mask = F.one_hot(labels, teacher_logits.shape[1]).bool()
    teacher = teacher_logits.masked_fill(mask, -1e9)
    student = student_logits.masked_fill(mask, -1e9)
    return kd_divergence(teacher, student, t)


@register_method("c2kd")
class C2KDStyle(KDMethod):
    """C2KD-style baseline: a proxy head on the projected student features learns the labels
    and receives the paired teacher's non-target class distribution, which shapes the shared
    student encoder; the student's own head trains with CE."""

    needs_pairs = True

    def __init__(self, bank: TeacherBank | None = None, **settings):
        super().__init__(bank, **settings)
        assert bank is not None
        self.proxy = nn.Linear(bank.features.shape[1], len(bank.classes))

    def extra(self, model: Classifier, batch: Batch, features, logits) -> Terms:
        proxy_logits = self.proxy(model.projector(features))
        teacher_logits = self.teacher_head(batch.teacher_features)
        t = self.kd_temperature
        return {
            "proxy_ce": (1.0, F.cross_entropy(proxy_logits, batch.labels)),
            "nckd": (
                self.w_kd,
                non_target_kd(teacher_logits, proxy_logits, batch.labels, t),
            ),
        }

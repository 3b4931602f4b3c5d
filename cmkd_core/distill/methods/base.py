"""What every distillation method shares: the batch it sees and the CE term it adds to.

A method is a module that turns one :class:`Batch` into named loss terms with ``"loss"`` the
one optimised. Most methods only add weighted terms to cross-entropy (:meth:`Method.extra`);
``bilevel`` overrides :meth:`Method.forward`. The training loop is the same for all.

Each method is configured once, at construction, with the settings it uses (keyword
arguments of its ``__init__``); :meth:`Method.from_params` takes them from the ``distill``
section of params.yaml (:meth:`Method.settings` names which).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cmkd_core.align import FeatureAligner
from cmkd_core.bank import TeacherBank
from cmkd_core.models import Classifier


@dataclass
class Batch:
    """One training batch.

    inputs : the student's labelled inputs, e.g. ``(x (B, T, F), lengths (B,))``.
    labels : Tensor ``(B,)`` int64.
    teacher_features : Tensor ``(B, d_T)``: bank rows of the same classes (unpaired) or the
        paired teacher samples themselves (paired); ``None`` for methods without a teacher.
    unlabelled : inputs of unlabelled student samples ``(U, ...)`` (their weak view when the
        method uses views), or ``None``.
    unlabelled_strong : the strong view of the same unlabelled samples, or ``None``.
    unlabelled_teacher : Tensor ``(U, d_T)``, bank rows drawn by the bank's class proportions
        (unpaired) or the unlabelled samples' own pairs (paired).
    step : index of this batch's optimiser step in the run (0-based).
    """

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    teacher_features: torch.Tensor | None = None
    unlabelled: tuple[torch.Tensor, ...] | None = None
    unlabelled_teacher: torch.Tensor | None = None
    unlabelled_strong: tuple[torch.Tensor, ...] | None = None
    step: int = 0


class SSLSettings(Protocol):
    """What the semi-supervised methods read of ``distill.ssl`` (``SSLParams`` of
    cmkd_core/config.py has these fields and more)."""

    weight: float
    start: int
    ramp: int
    threshold: float
    temperature: float
    eps: float
    iterations: int
    center: bool
    semantic: float
    semantic_temperature: float


class MethodError(ValueError):
    """A method cannot run on this data (for example, it needs pairs and there are none)."""


class Method(nn.Module):
    """Base class: CE with label smoothing plus the weighted terms of :meth:`extra`."""

    name = "base"
    needs_teacher = True
    needs_pairs = False
    aligns_features = False  # whether the semi-supervised option adds FA on unlabelled data
    uses_unlabelled = False  # trains on the unlabelled student samples whenever there are some
    uses_views = False  # needs the weak and strong views of those samples

    def __init__(
        self,
        bank: TeacherBank | None = None,
        *,
        label_smoothing: float = 0.1,
        alignment: FeatureAligner | None = None,
        unlabelled_fa: float | None = None,
    ):
        """``label_smoothing`` of the CE term; ``alignment``: the feature alignment of methods
        that align features; ``unlabelled_fa``: with such a method, the weight of an FA term on
        the unlabelled samples (``None``: no such term)."""
        super().__init__()
        if self.needs_teacher and bank is None:
            raise MethodError(f"method {self.name!r} needs a teacher bank")
        self.label_smoothing = label_smoothing
        self.alignment = alignment or FeatureAligner()
        self.unlabelled_fa = unlabelled_fa
        self.teacher_head = bank.head() if bank is not None else None

    @classmethod
    def settings(cls, params) -> dict:
        """This method's keyword arguments, from distill params (``DistillParams``)."""
        found: dict = {"label_smoothing": params.label_smoothing}
        if cls.aligns_features:
            found["alignment"] = FeatureAligner.of(params.ot)
            found["unlabelled_fa"] = params.w_fa if params.unlabelled else None
        return found

    @classmethod
    def from_params(cls, params, bank: TeacherBank | None = None) -> Method:
        """The method configured by distill ``params`` with the teacher ``bank``."""
        return cls(bank, **cls.settings(params))

    def extra(
        self, model: Classifier, batch: Batch, features: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Named ``(weight, term)`` pairs added to CE; ``features (B, d_S)``, ``logits (B, C)``."""
        return {}

    def fa(
        self,
        model: Classifier,
        features: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feature alignment of student features ``(B, d_S)`` to teacher rows ``(B, d_T)``;
        with ``labels (B,)`` (shared by both sides: rows are class-matched or paired) the
        ``ot.label_cost`` penalty applies."""
        return self.alignment(model.projector(features), teacher, labels)

    def forward(self, model: Classifier, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; ``"loss"`` is CE plus the weighted extra terms."""
        features = model.features(*batch.inputs)
        logits = model.head(features)
        terms = {"ce": F.cross_entropy(logits, batch.labels, label_smoothing=self.label_smoothing)}
        loss = terms["ce"]
        extra = self.extra(model, batch, features, logits)
        if self.unlabelled_fa is not None and batch.unlabelled is not None:
            assert batch.unlabelled_teacher is not None
            unlabelled = model.features(*batch.unlabelled)
            extra["fa_unlabelled"] = (
                self.unlabelled_fa,
                self.fa(model, unlabelled, batch.unlabelled_teacher),
            )
        for name, (weight, value) in extra.items():
            terms[name] = value
            loss = loss + weight * value
        terms["loss"] = loss
        return terms


class FAWeighted(Method):
    """A method with a feature-side term weighted by ``w_fa`` (FA, MMD, a hint loss)."""

    def __init__(self, bank: TeacherBank | None = None, *, w_fa: float = 1.0, **settings):
        super().__init__(bank, **settings)
        self.w_fa = w_fa

    @classmethod
    def settings(cls, params) -> dict:
        return {**super().settings(params), "w_fa": params.w_fa}


class KDMethod(Method):
    """A method with a distillation term: its weight ``w_kd`` and temperature
    ``kd_temperature``."""

    def __init__(
        self,
        bank: TeacherBank | None = None,
        *,
        w_kd: float = 1.0,
        kd_temperature: float = 4.0,
        **common,
    ):
        super().__init__(bank, **common)
        self.w_kd, self.kd_temperature = w_kd, kd_temperature

    @classmethod
    def settings(cls, params) -> dict:
        found = {"w_kd": params.w_kd, "kd_temperature": params.kd_temperature}
        return {**super().settings(params), **found}


def ramp_weight(step: int, weight: float, start: int, ramp: int) -> float:
    """``0`` for the first ``start`` steps, then rising linearly to ``weight`` over ``ramp``."""
    if step < start:
        return 0.0
    return weight * min(1.0, (step - start + 1) / ramp) if ramp > 0 else weight


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of ``-sum_c targets[i, c] * log_softmax(logits)[i, c]``; both ``(N, C)``."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def kd_divergence(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float
) -> torch.Tensor:
    """Hinton's ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``; inputs ``(B, C)``."""
    target = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), target, reduction="batchmean") * t * t

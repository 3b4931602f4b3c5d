"""The distillation objective as a module returning named loss terms.

``joint``: ``L = CE + w_fa * FA + w_la * LA`` (arXiv:2606.10504, joint scheme); ``ce``: the
student alone (``w_fa = w_la = 0``). Terms whose weight is 0 are not computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmkd_core.align import feature_alignment, label_alignment
from cmkd_core.align.feature import Cost
from cmkd_core.align.label import LAForm
from cmkd_core.config import DistillParams
from cmkd_core.models import Classifier

METHODS = ("ce", "joint")


class DistillObjective(nn.Module):
    """Configure once, call per batch; see the module docstring for the objective."""

    def __init__(
        self,
        *,
        w_fa: float = 0.0,
        w_la: float = 0.0,
        la_form: LAForm = "aligned",
        cost: Cost = "cosine",
        reg: float = 0.1,
        num_iter: int = 100,
        label_smoothing: float = 0.0,
        teacher_head: nn.Linear | None = None,
    ):
        super().__init__()
        if w_la > 0 and teacher_head is None:
            raise ValueError("label alignment (w_la > 0) needs the teacher's head")
        self.w_fa, self.w_la, self.la_form = w_fa, w_la, la_form
        self.cost, self.reg, self.num_iter = cost, reg, num_iter
        self.label_smoothing = label_smoothing
        self.teacher_head = teacher_head
        if teacher_head is not None:
            teacher_head.requires_grad_(False).eval()

    @property
    def needs_teacher(self) -> bool:
        return self.w_fa > 0 or self.w_la > 0

    def forward(
        self,
        model: Classifier,
        inputs: tuple[torch.Tensor, ...],
        labels: torch.Tensor,
        teacher_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one batch.

        Parameters
        ----------
        model : the student; ``model.features(*inputs)`` gives ``(B, d_S)``.
        inputs : the student's batch, e.g. ``(x (B, T, F), lengths (B,))``.
        labels : Tensor ``(B,)`` int64.
        teacher_features : Tensor ``(B, d_T)``, class-matched bank rows (needed if w_fa > 0).

        Returns ``{"ce", ["fa"], ["la"], "loss"}``, scalars; ``"loss"`` is the weighted sum.
        """
        features = model.features(*inputs)
        logits = model.head(features)
        terms = {"ce": F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)}
        loss = terms["ce"]
        if self.needs_teacher:
            aligned = model.projector(features)
            if self.w_fa > 0:
                if teacher_features is None or teacher_features.shape[0] != features.shape[0]:
                    raise ValueError("feature alignment needs teacher_features of shape (B, d_T)")
                terms["fa"] = feature_alignment(
                    aligned, teacher_features, self.cost, self.reg, self.num_iter
                )
                loss = loss + self.w_fa * terms["fa"]
            if self.w_la > 0:
                assert self.teacher_head is not None
                z = self.teacher_head(aligned)
                terms["la"] = label_alignment(logits, z, labels, self.la_form)
                loss = loss + self.w_la * terms["la"]
        terms["loss"] = loss
        return terms


def objective_for(
    method: str, params: DistillParams, teacher_head: nn.Linear | None = None
) -> DistillObjective:
    """The objective of ``method`` (one of :data:`METHODS`) with the weights in ``params``."""
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    weights = (0.0, 0.0) if method == "ce" else (params.w_fa, params.w_la)
    return DistillObjective(
        w_fa=weights[0],
        w_la=weights[1],
        la_form=params.la_form,
        cost=params.ot.cost,
        reg=params.ot.reg,
        num_iter=params.ot.num_iter,
        label_smoothing=params.label_smoothing,
        teacher_head=teacher_head if weights[1] > 0 else None,
    )

"""Label alignment (LA): the teacher's frozen head judges the student's features.

With student logits ``s = head_S(f_S)``, teacher-head logits ``z = head_T(P f_S)`` (``P`` the
projector) and ``kappa = softmax(z).detach()``, the authors' code computes

    LA_reference = nll(log_softmax(s) - kappa * log_softmax(z), y)
                 = CE(s, y) - kappa_y * CE(z, y),

which *rewards* the teacher's head for misclassifying the student's features (the second term
falls as ``CE(z, y)`` grows). We keep that form as ``"reference"`` and default to the
sign-corrected ``"aligned"`` form

    LA_aligned = nll(log_softmax(s) + kappa * log_softmax(z), y)
               = CE(s, y) + kappa_y * CE(z, y),

which pulls the student's features into the regions the teacher's head assigns to the right
class, weighted by the head's confidence, as the paper's label-alignment term intends.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LAForm = Literal["reference", "aligned"]


def label_alignment(
    student_logits: torch.Tensor,
    teacher_head_logits: torch.Tensor,
    labels: torch.Tensor,
    form: LAForm = "aligned",
) -> torch.Tensor:
    """Label-alignment loss, a scalar.

    Parameters
    ----------
    student_logits : Tensor ``(B, C)``, the student's own head on its features.
    teacher_head_logits : Tensor ``(B, C)``, the teacher's frozen head on the (projected)
        student features; gradients flow through it into the student encoder.
    labels : Tensor ``(B,)`` int64, class indices.
    form : ``"aligned"`` (default) or ``"reference"``, see the module docstring.
    """
    if student_logits.shape != teacher_head_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_head_logits "
            f"{tuple(teacher_head_logits.shape)} must both be (B, C)"
        )
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, expected ({len(student_logits)},)"
        )
    if form not in ("reference", "aligned"):
        raise ValueError(f"unknown label-alignment form {form!r}; valid: reference, aligned")
    log_q = F.log_softmax(teacher_head_logits, dim=1)
    kappa = log_q.exp().detach()
    sign = -1.0 if form == "reference" else 1.0
    return F.nll_loss(F.log_softmax(student_logits, dim=1) + sign * kappa * log_q, labels)

"""FixMatch: the teacher-free semi-supervised baseline.

On each unlabelled sample, the student's prediction on the weak view becomes a hard
pseudo-label when its confidence reaches ``ssl.threshold``; the student learns it from the
strong view. The term is off for the first ``ssl.start`` steps and then ramps up (see
:func:`~cmkd_core.distill.methods.base.ramp_weight`). No teacher is used: a gain of a
teacher-guided method over this one is what the teacher adds beyond unlabelled data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmkd_core.bank import TeacherBank
from cmkd_core.distill.methods.base import Batch, Method, SSLSettings, ramp_weight
from cmkd_core.distill.methods.registry import register_method
from cmkd_core.models import Classifier


def fixmatch_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked pseudo-label cross-entropy and the share of samples kept; logits ``(U, C)``.

    The pseudo-labels are ``argmax softmax(weak_logits)`` (no gradient); samples below
    ``threshold`` confidence count as zero in the mean over all ``U``."""
    with torch.no_grad():
        confidence, pseudo = F.softmax(weak_logits.float(), dim=1).max(1)
        keep = (confidence >= threshold).to(strong_logits.dtype)
    loss = (F.cross_entropy(strong_logits, pseudo, reduction="none") * keep).mean()
    return loss, keep.mean()


@register_method("fixmatch")
class FixMatch(Method):
    """CE on the labelled batch + ramped masked pseudo-label CE on the unlabelled one."""

    needs_teacher = False
    uses_unlabelled = True
    uses_views = True

    def __init__(self, bank: TeacherBank | None = None, *, ssl: SSLSettings, **common):
        """``ssl``: ``distill.ssl`` (weight, start, ramp, threshold)."""
        super().__init__(bank, **common)
        self.ssl = ssl

    @classmethod
    def settings(cls, params) -> dict:
        return {**super().settings(params), "ssl": params.ssl}

    def extra(self, model: Classifier, batch: Batch, features, logits):
        if batch.unlabelled is None or batch.unlabelled_strong is None:
            return {}
        ssl = self.ssl
        weight = ramp_weight(batch.step, ssl.weight, ssl.start, ssl.ramp)
        if weight == 0.0:
            return {}
        with torch.no_grad():
            weak = model(*batch.unlabelled)
        loss, kept = fixmatch_loss(weak, model(*batch.unlabelled_strong), ssl.threshold)
        return {"pseudo": (weight, loss), "pseudo_kept": (0.0, kept)}

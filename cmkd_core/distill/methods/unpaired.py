"""Methods that need no pairs: the paper's FA, LA and joint, and two baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmkd_core.align import label_alignment
from cmkd_core.bank import TeacherBank
from cmkd_core.distill.methods.base import Batch, FAWeighted, KDMethod, Method, kd_divergence
from cmkd_core.distill.methods.registry import register_method
from cmkd_core.models import Classifier

Terms = dict[str, tuple[float, torch.Tensor]]


@register_method("ce")
class CrossEntropy(Method):
    """The student alone: cross-entropy on its labelled samples."""

    needs_teacher = False


@register_method("fa")
class FeatureAlignment(FAWeighted):
    """CE + w_fa * FA (entropic OT between projected student and teacher features)."""

    aligns_features = True

    def extra(self, model: Classifier, batch: Batch, features, logits) -> Terms:
        return {"fa": (self.w_fa, self.fa(model, features, batch.teacher_features, batch.labels))}


@register_method("la")
class LabelAlignment(Method):
    """CE + w_la * LA (the teacher's frozen head on the projected student features)."""

    def __init__(
        self,
        bank: TeacherBank | None = None,
        *,
        w_la: float = 1.0,
        la_form: str = "aligned",
        **common,
    ):
        super().__init__(bank, **common)
        self.w_la, self.la_form = w_la, la_form

    @classmethod
    def settings(cls, params) -> dict:
        return {**super().settings(params), "w_la": params.w_la, "la_form": params.la_form}

    def la(self, model: Classifier, batch: Batch, features, logits) -> torch.Tensor:
        z = self.teacher_head(model.projector(features))
        return label_alignment(logits, z, batch.labels, self.la_form)

    def extra(self, model: Classifier, batch: Batch, features, logits) -> Terms:
        return {"la": (self.w_la, self.la(model, batch, features, logits))}


@register_method("joint")
class Joint(LabelAlignment, FAWeighted):
    """The paper's joint scheme: CE + w_fa * FA + w_la * LA, one step per batch."""

    aligns_features = True

    def extra(self, model: Classifier, batch: Batch, features, logits) -> Terms:
        return {
            "fa": (self.w_fa, self.fa(model, features, batch.teacher_features, batch.labels)),
            "la": (self.w_la, self.la(model, batch, features, logits)),
        }


@register_method("prototype_kd")
class PrototypeKD(KDMethod):
    """Baseline: distil the teacher's class-mean soft labels (no pairs needed).

    For class ``c`` the target is the mean of ``softmax(head_T(f_T) / T)`` over the bank's
    train rows of class ``c``; the student matches it with Hinton's KD loss.
    """

    def __init__(self, bank: TeacherBank | None = None, **settings):
        super().__init__(bank, **settings)
        assert bank is not None and self.teacher_head is not None
        keep = bank.split("train")
        with torch.no_grad():
            probs = F.softmax(self.teacher_head(bank.features[keep]) / self.kd_temperature, 1)
        sums = torch.zeros(len(bank.classes), probs.shape[1]).index_add_(
            0, bank.labels[keep], probs
        )
        self.register_buffer("prototypes", sums / sums.sum(1, keepdim=True))

    def extra(self, model: Classifier, batch: Batch, features, logits) -> Terms:
        t = self.kd_temperature
        target = self.prototypes[batch.labels]
        kd = F.kl_div(F.log_softmax(logits / t, 1), target, reduction="batchmean") * t * t
        return {"kd": (self.w_kd, kd)}


def _gaussian_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 between ``x (n, d)`` and ``y (m, d)`` with a sum of Gaussian kernels whose
    bandwidths are multiples of the median pairwise distance (detached)."""
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    scale = d2.detach().median().clamp_min(1e-6)
    k = sum(torch.exp(-d2 / (scale * s)) for s in (0.25, 1.0, 4.0))
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


@register_method("mmd")
class MMDAlignment(FAWeighted):
    """Baseline: CE + w_fa * MMD between projected student and class-matched teacher features."""

    aligns_features = False

    def extra(self, model: Classifier, batch: Batch, features, logits) -> Terms:
        mmd = _gaussian_mmd(model.projector(features), batch.teacher_features)
        return {"mmd": (self.w_fa, mmd)}


__all__ = ["kd_divergence"]

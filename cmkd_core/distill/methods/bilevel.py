"""The paper's first-order bilevel scheme.

Per batch: copy the student; take ``inner_steps_fa`` AdamW steps on FA and ``inner_steps_la``
on LA (student features detached, so only the heads move) at ``inner_lr``; evaluate CE at the
copy's parameters; the gradient of that CE is what the real student receives. The returned
``loss`` has the value of that CE and, with respect to the real student's parameters, exactly
the copy's gradient, so the shared loop's backward, clipping and outer step apply it. The
copy's buffers (normalisation statistics) are copied back.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cmkd_core.align import label_alignment
from cmkd_core.bank import TeacherBank
from cmkd_core.distill.methods.base import Batch
from cmkd_core.distill.methods.registry import register_method
from cmkd_core.distill.methods.unpaired import Joint
from cmkd_core.models import Classifier


@register_method("bilevel")
class Bilevel(Joint):
    """First-order bilevel FA/LA inner steps, CE outer step (see the module docstring)."""

    def __init__(
        self,
        bank: TeacherBank | None = None,
        *,
        inner_lr: float = 5e-5,
        inner_steps_fa: int = 1,
        inner_steps_la: int = 1,
        **joint,
    ):
        super().__init__(bank, **joint)
        self.inner_lr, self.inner_steps_fa, self.inner_steps_la = (
            inner_lr,
            inner_steps_fa,
            inner_steps_la,
        )

    @classmethod
    def settings(cls, params) -> dict:
        inner = {k: getattr(params, k) for k in ("inner_lr", "inner_steps_fa", "inner_steps_la")}
        return {**super().settings(params), **inner}

    def forward(self, model: Classifier, batch: Batch) -> dict[str, torch.Tensor]:
        inner_model = copy.deepcopy(model)
        inner = torch.optim.AdamW(inner_model.parameters(), lr=self.inner_lr, weight_decay=0.05)
        terms: dict[str, torch.Tensor] = {}
        for _ in range(self.inner_steps_fa):
            inner.zero_grad(set_to_none=True)
            fa = self.fa(
                inner_model,
                inner_model.features(*batch.inputs),
                batch.teacher_features,
                batch.labels,
            )
            fa.backward()
            inner.step()
            terms["fa"] = fa.detach()
        for _ in range(self.inner_steps_la):
            inner.zero_grad(set_to_none=True)
            features = inner_model.features(*batch.inputs).detach()
            z = self.teacher_head(inner_model.projector(features))
            la = label_alignment(inner_model.head(features), z, batch.labels, self.la_form)
            la.backward()
            inner.step()
            terms["la"] = la.detach()
        ce = F.cross_entropy(
            inner_model(*batch.inputs), batch.labels, label_smoothing=self.label_smoothing
        )
        params = list(model.parameters())
        grads = torch.autograd.grad(ce, list(inner_model.parameters()), allow_unused=True)
        surrogate = sum(
            (param * grad).sum()
            for param, grad in zip(params, grads, strict=True)
            if grad is not None
        )
        with torch.no_grad():
            for real, moved in zip(model.buffers(), inner_model.buffers(), strict=True):
                real.copy_(moved)
        terms["ce"] = ce.detach()
        terms["loss"] = surrogate - surrogate.detach() + ce.detach()
        return terms

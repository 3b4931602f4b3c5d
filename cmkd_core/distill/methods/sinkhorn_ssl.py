"""Teacher-guided semi-supervised distillation without pairs: balanced Sinkhorn targets.

What the teacher bank offers a student without pairs is its class structure: where each
class sits in the teacher's feature space (the class means ``mu_c``, normalised) and how often
each class occurs (the bank's class proportions ``pi``). This method uses both.

* Prototype logits ``r(f) = cos(P f, mu_c) / ssl.temperature`` place the student's projected
  features ``P f`` (``P``: the student's projector into the teacher's space) against the
  teacher's class means. On labelled samples the loss is ``CE(head(f), y) + CE(r(f), y)``.
* On an unlabelled batch, the weak view's cost ``1 - cos(P f, mu_c)`` is turned into soft
  targets ``q`` by a balanced entropic assignment (:func:`cmkd_core.align.balanced_assignment`:
  marginals uniform over the batch and ``pi`` over the classes, ``ssl.eps``,
  ``ssl.iterations``, no gradient); the strong view learns them with
  ``softCE(head(f_s), q) + softCE(r(f_s), q)``, off for ``ssl.start`` steps and then ramped.

With ``ssl.semantic`` the bank's class similarities also become soft labels (which other
classes a sample of class ``y`` resembles, :func:`class_semantics`): a term beside the labelled
CE, and a share of every unlabelled target. With no unlabelled samples it reduces to its
labelled terms. The benchmark's controls replace
the bank's class means with random unit vectors (``random_prototypes``) or permute its classes
(``shuffled``) to tell the teacher's contribution from that of the unlabelled data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmkd_core.align import balanced_assignment
from cmkd_core.align.similarity import class_means
from cmkd_core.bank import TeacherBank
from cmkd_core.distill.methods.base import (
    Batch,
    Method,
    SSLSettings,
    ramp_weight,
    soft_cross_entropy,
)
from cmkd_core.distill.methods.registry import register_method
from cmkd_core.models import Classifier


def class_prototypes(bank: TeacherBank, center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised class means ``(C, d_T)`` and class proportions ``(C,)`` of the bank's train
    rows; ``center`` subtracts the mean of those rows first."""
    keep = bank.split("train")
    labels, features = bank.labels[keep], bank.features[keep].float()
    means = class_means(features, labels, len(bank.classes))
    if center:
        means = means - features.mean(0)
    return F.normalize(means, dim=1), bank.class_proportions()


def class_semantics(prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """``K (C, C)``: row ``y`` is a distribution over the classes other than ``y``,
    ``softmax_{c != y}(cos(mu_y, mu_c) / temperature)``, from unit class means ``(C, d)``
    (``ssl.semantic``: which classes the teacher finds alike)."""
    similarity = prototypes @ prototypes.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    return F.softmax(similarity, dim=1)


@register_method("sinkhorn_ssl")
class SinkhornSSL(Method):
    """CE + prototype CE on labelled samples; balanced Sinkhorn soft targets on unlabelled."""

    uses_unlabelled = True
    uses_views = True

    def __init__(self, bank: TeacherBank | None = None, *, ssl: SSLSettings, **common):
        """``ssl``: ``distill.ssl`` (weight, start, ramp, temperature, eps, iterations, center,
        semantic, semantic_temperature)."""
        super().__init__(bank, **common)
        self.ssl = ssl
        assert bank is not None
        prototypes, proportions = class_prototypes(bank, ssl.center)
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("proportions", proportions)
        self.register_buffer("semantics", class_semantics(prototypes, ssl.semantic_temperature))

    @classmethod
    def settings(cls, params) -> dict:
        return {**super().settings(params), "ssl": params.ssl}

    def prototype_logits(self, model: Classifier, features: torch.Tensor) -> torch.Tensor:
        """``cos(P f, mu_c) / temperature`` ``(B, C)`` for student features ``(B, d_S)``."""
        projected = F.normalize(model.projector(features).float(), dim=1)
        return projected @ self.prototypes.T / self.ssl.temperature

    def extra(self, model: Classifier, batch: Batch, features, logits):
        proto = F.cross_entropy(self.prototype_logits(model, features), batch.labels)
        terms = {"proto_ce": (1.0, proto)}
        ssl = self.ssl
        if ssl.semantic > 0:
            semantic = soft_cross_entropy(logits, self.semantics[batch.labels])
            terms["semantic"] = (ssl.semantic, semantic)
        weight = ramp_weight(batch.step, ssl.weight, ssl.start, ssl.ramp)
        if batch.unlabelled is None or batch.unlabelled_strong is None or weight == 0.0:
            return terms
        with torch.no_grad():
            weak = F.normalize(model.projector(model.features(*batch.unlabelled)).float(), dim=1)
            targets, _ = balanced_assignment(
                1.0 - weak @ self.prototypes.T, self.proportions, ssl.eps, ssl.iterations
            )
            if ssl.semantic > 0:
                mix = min(1.0, ssl.semantic)
                targets = (1.0 - mix) * targets + mix * targets @ self.semantics
        strong = model.features(*batch.unlabelled_strong)
        loss = soft_cross_entropy(model.head(strong), targets) + soft_cross_entropy(
            self.prototype_logits(model, strong), targets
        )
        terms["sinkhorn"] = (weight, loss)
        return terms

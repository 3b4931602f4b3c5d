"""Before training: should the teacher be expected to name the classes without labels?

A class the student has no label for can only be named through what the teacher knows of it:
where it sits among the other classes (cmkd_core/data/unseen.py). That carries over where the
two modalities agree on which classes resemble which. The class-similarity diagnostic
(:mod:`cmkd_core.align.similarity`) measures that agreement against a CE-only student, which
takes a training run. This check takes none: it compares the teacher's class similarities with
those of the student's raw inputs (the class means of the flattened inputs, or of each clip's
frames averaged over its length), over the classes that have labels only, from the labelled
train samples and the validation samples of those classes. No label of a class without labels
is read.

The thresholds come from the three pairs measured in docs/results.md ("Classes without
labels"): raw-input r of +0.68 (mnist->mnist8x8) and +0.43 (mnist->digits8x8), where the
teacher names 71 % and 89 % of the unlabelled classes' samples (controls at most 33 %), and
-0.03 (digits->fsdd), where it does no better than its controls. They are a rule of thumb from
three pairs, not a calibrated test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cmkd_core.align.similarity import class_similarity, similarity_correlation
from cmkd_core.bank import TeacherBank
from cmkd_core.data.tensors import Samples

EXPECT = 0.4
"""Raw-input r at or above which the teacher is expected to name unlabelled classes."""
DOUBT = 0.2
"""Raw-input r below which it is not."""


def input_vectors(samples: Samples) -> torch.Tensor:
    """One float64 vector per sample ``(N, D)``: fixed-size inputs ``(N, *shape)`` flattened, or
    each sequence's frames ``(length, F)`` averaged (``(N, F)``)."""
    if samples.is_sequence:
        lengths = samples.inputs[2]
        frames = samples.frames().flatten(1).double()
        owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        summed = torch.zeros(len(lengths), frames.shape[1], dtype=torch.float64)
        summed.index_add_(0, owner, frames)
        return summed / lengths.clamp_min(1)[:, None].double()
    return samples.inputs[0].flatten(1).double()


def verdict(r: float) -> str:
    """What raw-input r says about naming the classes without labels (module docstring)."""
    if r >= EXPECT:
        return "expect the teacher to name them"
    if r >= DOUBT:
        return "uncertain: the teacher may name some of them"
    return "do not expect the teacher to name them (better than chance at most)"


def input_outlook(
    bank: TeacherBank,
    samples: Sequence[Samples],
    hidden: Sequence[int],
    permutations: int = 1000,
) -> dict:
    """Correlation of the teacher's class similarities (the bank's train rows) with those of the
    raw inputs of ``samples`` (labels index the bank's classes), over the classes not in
    ``hidden`` (the bank's indices of the classes without labels; samples of those are
    dropped, so their labels are never used). Returns ``correlation``, ``p_value`` (Mantel, as
    :func:`~cmkd_core.align.similarity.similarity_correlation`), ``classes`` (how many were
    compared) and ``verdict``. Needs at least 3 labelled classes."""
    num = len(bank.classes)
    shown = [c for c in range(num) if c not in set(hidden)]
    vectors, labels = [], []
    for part in samples:
        keep = ~torch.isin(part.labels.cpu(), torch.as_tensor(list(hidden), dtype=torch.long))
        vectors.append(input_vectors(part.to("cpu"))[keep])
        labels.append(part.labels.cpu()[keep])
    train = bank.split("train")
    teacher = class_similarity(bank.features[train], bank.labels[train], num)
    student = class_similarity(torch.cat(vectors), torch.cat(labels), num)
    index = np.ix_(shown, shown)
    found = similarity_correlation(teacher[index], student[index], permutations)
    r = found["correlation"]
    return {
        "correlation": r,
        "p_value": found["p_value"],
        "classes": len(shown),
        "verdict": verdict(r),
    }


def outlook_line(found: dict, hidden_names: Sequence[str]) -> str:
    """One printable line for :func:`input_outlook`'s result."""
    return (
        f"before training, {len(hidden_names)} classes without labels "
        f"({', '.join(hidden_names)}): the teacher's class similarities against the raw "
        f"inputs' over the {found['classes']} labelled classes r = {found['correlation']:+.2f} "
        f"(p = {found['p_value']:.3f}): {found['verdict']}"
    )

"""Batches: shuffled epochs over a labelled set, and class-matched draws from a teacher bank.

"Unpaired" means class-matched, not instance-matched: for every student sample of class ``y``
in a batch, a random teacher-bank row of class ``y`` is drawn, so both sides of a batch carry
the same label multiset and no student sample is tied to a particular teacher sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield index tensors ``(<= batch_size,)`` covering ``range(n)`` once in a random order.

    A last batch of a single sample is merged into the previous one (a batch of one has no
    distribution to align).
    """
    order = torch.randperm(n, generator=generator)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[start:end]


class ClassMatchedSampler:
    """Draw teacher-bank rows whose labels equal a given batch of student labels.

    Parameters
    ----------
    bank_labels : Tensor of shape ``(n_bank,)``, int64
        Class index of every bank row that may be drawn (the bank's train split).
    num_classes : int
        Size of the shared class list; a class with no bank row is an error at construction.
    """

    def __init__(self, bank_labels: torch.Tensor, num_classes: int):
        if bank_labels.ndim != 1:
            raise ValueError(f"bank_labels must have shape (n,), got {tuple(bank_labels.shape)}")
        counts = torch.bincount(bank_labels, minlength=num_classes)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            raise ValueError(f"the teacher bank has no row of class index {empty}")
        order = torch.argsort(bank_labels, stable=True)
        self._order = order
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts

    def draw(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Bank row indices ``(B,)`` with ``bank_labels[result] == labels`` for ``labels (B,)``.

        Rows are drawn uniformly at random within each class, with replacement across batches.
        """
        labels = labels.to(self._counts.device)
        u = torch.rand(labels.shape, generator=generator, device=self._counts.device)
        offset = (u * self._counts[labels]).long().clamp_max(self._counts[labels] - 1)
        return self._order[self._starts[labels] + offset]


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of about ``size`` of ``labels (N,)``, each class in proportion to its
    count (at least one each), drawn with ``seed``; all of them when ``size >= N``."""
    if size >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        take = max(1, round(size * len(members) / len(labels)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.sort(torch.cat(chosen)).values

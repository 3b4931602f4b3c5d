"""One batch source for every trainer: what a training step sees.

:class:`BatchSource` draws, from one seeded generator, each round's labelled batches (with the
augmentation of the training inputs), the teacher rows each batch needs (class-matched rows of
the bank's train split, or each sample's own pair), and the unlabelled student samples (their
weak and strong views, and bank rows in the bank's class proportions or their pairs). The
single-process trainer, the data-parallel one and the benchmark all train from it, so they see
the same batches from the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from cmkd_core.bank import TeacherBank
from cmkd_core.data.augment import Augment, Views
from cmkd_core.data.samplers import ClassMatchedSampler, epoch_batches
from cmkd_core.data.tensors import Samples
from cmkd_core.distill.methods import Batch, Method, MethodError

if TYPE_CHECKING:
    from cmkd_core.distill.train import TrainSettings


def steps_per_round(n: int, settings: TrainSettings) -> int:
    """Optimiser steps between two evaluations for ``n`` training samples: one pass over them,
    or more passes when ``settings.min_steps`` asks for more steps than ``epochs`` passes."""
    per_pass = len(list(epoch_batches(n, settings.batch_size, torch.Generator())))
    return max(per_pass, math.ceil(settings.min_steps / settings.epochs))


def round_batches(
    n: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """``steps`` index batches from consecutive shuffled passes over ``range(n)`` (see
    :func:`epoch_batches`); what is left of the last pass is dropped, so a round depends only on
    the generator's state at its start (a resumed run draws the same batches)."""
    done = 0
    while done < steps:
        for index in epoch_batches(n, batch_size, generator):
            yield index
            done += 1
            if done == steps:
                return


class BatchSource:
    """The batches of one training run; calling it with an epoch yields that round's batches.

    ``train`` holds the labelled samples (on the model's device; ``train.pair_index`` with
    ``pairing="paired"``). The method decides what each batch carries: teacher rows when it
    needs the teacher (``bank``), ``unlabelled`` samples when it learns from them or aligns
    features on them, as ``views`` when given. ``augment`` transforms the labelled inputs.
    Every draw comes from :attr:`generator`, seeded by ``settings.seed``: a resumed run restores
    it and draws the same batches. Raises :class:`MethodError` (its message starting with
    ``desc``) when the data cannot serve the method.
    """

    def __init__(
        self,
        train: Samples,
        method: Method,
        settings: TrainSettings,
        *,
        bank: TeacherBank | None = None,
        pairing: str = "unpaired",
        unlabelled: Samples | None = None,
        augment: Augment | None = None,
        views: Views | None = None,
        desc: str = "train",
    ):
        if method.needs_pairs and pairing != "paired":
            raise MethodError(
                f"method {method.name!r} needs instance pairs and refuses unpaired data; "
                "use it with pairing 'paired' on a dataset whose manifest has a 'pair' column"
            )
        if pairing == "paired" and train.pair_index is None:
            raise MethodError(
                f"{desc}: pairing 'paired' but the training samples carry no pair keys"
            )
        self.train, self.settings, self.augment, self.views = train, settings, augment, views
        self.paired = pairing == "paired"
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.device = train.labels.device
        self.sampler = None
        if method.needs_teacher:
            if bank is None:
                raise MethodError(f"{desc}: method {method.name!r} needs a teacher bank")
            self.bank_features = bank.features.to(self.device)
            self.bank_train = torch.nonzero(bank.split("train")).flatten()
            self.sampler = ClassMatchedSampler(bank.labels[self.bank_train], len(bank.classes))
        use = unlabelled is not None and len(unlabelled) > 1
        use = use and (self.sampler is not None or method.uses_unlabelled)
        if use and self.paired and self.sampler is not None and unlabelled.pair_index is None:
            raise MethodError(f"{desc}: pairing 'paired' but the unlabelled samples have no pairs")
        self.unlabelled = unlabelled if use else None
        self.per_round = steps_per_round(len(train), settings)

    def __call__(self, epoch: int) -> Iterator[Batch]:
        """Round ``epoch``'s batches (1-based), :attr:`per_round` of them."""
        train, generator = self.train, self.generator
        rounds = round_batches(len(train), self.settings.batch_size, self.per_round, generator)
        for i, index in enumerate(rounds):
            inputs, labels = train.take(index)
            if self.augment is not None:
                inputs = self.augment(inputs, generator)
            batch = Batch(inputs, labels, step=(epoch - 1) * self.per_round + i)
            if self.sampler is not None:
                if self.paired:
                    rows = train.pair_index[index.to(train.labels.device)]
                else:
                    rows = self.bank_train[self.sampler.draw(labels.cpu(), generator)]
                batch.teacher_features = self.bank_features[rows.to(self.device)]
            if self.unlabelled is not None:
                self._add_unlabelled(batch)
            yield batch

    def _add_unlabelled(self, batch: Batch) -> None:
        """Draw the batch's unlabelled samples (and their views and teacher rows)."""
        unlabelled, generator = self.unlabelled, self.generator
        size = min(len(unlabelled), self.settings.unlabelled_batch_size)
        pick = torch.randperm(len(unlabelled), generator=generator)[:size]
        plain = unlabelled.take(pick)[0]
        batch.unlabelled = plain if self.views is None else self.views.weak(plain, generator)
        if self.views is not None:
            batch.unlabelled_strong = self.views.strong(plain, generator)
        if self.sampler is not None and self.paired:
            rows = unlabelled.pair_index[pick.to(unlabelled.labels.device)]
            batch.unlabelled_teacher = self.bank_features[rows.to(self.device)]
        elif self.sampler is not None:
            drawn = torch.randint(len(self.bank_train), (size,), generator=generator)
            batch.unlabelled_teacher = self.bank_features[self.bank_train[drawn].to(self.device)]

"""The one training loop. Methods differ only in the loss terms they return per batch.

``fit`` runs epochs of optimiser steps on the ``"loss"`` term of a step function, evaluates
after each epoch and hands an epoch record to callbacks; logging, progress, model selection and
checkpoints hang on callbacks, never inside the loop.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

Batch = Any
StepFn = Callable[[Batch], dict[str, torch.Tensor]]


class Callback:
    """Hooks called by :func:`fit`; override what you need."""

    def on_epoch_end(self, record: dict[str, float], model: nn.Module) -> None:
        """After each epoch, with the epoch's record (mean loss terms and validation metrics)."""

    def on_train_end(self, model: nn.Module) -> None:
        """Once, after the last epoch."""


class BestCheckpoint(Callback):
    """Keep the weights of the epoch with the highest ``monitor`` value (earliest on ties).

    Selection reads a validation metric only; test data never reaches the loop.
    """

    def __init__(self, monitor: str = "val_accuracy", restore: bool = True):
        self.monitor = monitor
        self.restore = restore
        self.best_value = -math.inf
        self.best_epoch = 0
        self.state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, record: dict[str, float], model: nn.Module) -> None:
        value = record[self.monitor]
        if value > self.best_value:
            self.best_value, self.best_epoch = value, int(record["epoch"])
            self.state = copy.deepcopy(model.state_dict())

    def on_train_end(self, model: nn.Module) -> None:
        if self.restore and self.state is not None:
            model.load_state_dict(self.state)


class ProgressBar(Callback):
    """One tqdm bar that advances once per epoch and shows the loss and validation accuracy."""

    def __init__(self, total: int, desc: str, disable: bool = False, initial: int = 0):
        self.bar = tqdm(
            total=total, desc=desc, unit="epoch", disable=disable, leave=True, initial=initial
        )

    def on_epoch_end(self, record: dict[str, float], model: nn.Module) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", val_acc=f"{record['val_accuracy']:.3f}")
        self.bar.update(1)

    def on_train_end(self, model: nn.Module) -> None:
        self.bar.close()


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_step(
    model: nn.Module,
    step: StepFn,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimisation step on ``batch``: the loss terms, backward, clipping, optimiser and
    scheduler steps. Returns the terms (scalar tensors, still on the model's device). With
    ``amp`` the loss terms are computed under bf16 autocast (backward follows it)."""
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        terms = step(batch)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return terms


def fit(
    model: nn.Module,
    step: StepFn,
    batches: Callable[[int], Iterable[Batch]],
    validate: Callable[[], dict[str, float]],
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    callbacks: Sequence[Callback] = (),
    start_epoch: int = 1,
    history: Sequence[dict[str, float]] = (),
    amp: bool = False,
) -> list[dict[str, float]]:
    """Train ``model`` and return one record per epoch.

    ``step(batch)`` returns named scalar loss terms including ``"loss"``, the one optimised;
    ``batches(epoch)`` yields the epoch's batches; ``validate()`` runs with the model in eval
    mode under ``no_grad`` and returns metrics such as ``val_accuracy``. A resumed run starts
    at ``start_epoch`` with the records of the epochs before it in ``history``. ``amp``: see
    :func:`train_step`.
    """
    history = list(history)
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in batches(epoch):
            terms = train_step(model, step, batch, optimizer, scheduler, grad_clip, amp)
            for name, value in terms.items():  # summed on the device: no sync per step
                sums[name] = value.detach() + sums[name] if name in sums else value.detach()
            count += 1
        model.eval()
        with torch.no_grad():
            metrics = validate()
        means = {k: float(v) / max(count, 1) for k, v in sums.items()}
        record = {"epoch": epoch, **means, **metrics}
        record["lr"] = optimizer.param_groups[0]["lr"]
        history.append(record)
        for callback in callbacks:
            callback.on_epoch_end(record, model)
    for callback in callbacks:
        callback.on_train_end(model)
    return history

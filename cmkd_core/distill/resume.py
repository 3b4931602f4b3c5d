"""Per-epoch training checkpoints, so a killed run resumes where it stopped, exactly.

:class:`ResumeCheckpoint` is a callback of the training loop. After every epoch it writes,
atomically (a temporary file renamed over the last one), everything the rest of the run
depends on: the model's and the method's weights, the optimiser's and the scheduler's state,
the batch generator's state (it draws batches, class-matched teacher rows, augmentations), the
global torch random state (dropout), the best epoch so far with its weights, and the history.
:meth:`ResumeCheckpoint.restore` puts all of it back before the loop starts at the next epoch,
so an interrupted run that is resumed performs the same floating-point operations in the same
order as one that was not: on the CPU the result is bitwise identical.

The file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only. Anything else (a pickle with code in it) is refused with
:class:`CheckpointError` before any of it runs. A checkpoint written for other settings (its
``key`` differs) is ignored, not loaded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmkd_core.data.contract import atomic_path
from cmkd_core.distill.loop import BestCheckpoint, Callback

FORMAT = "cmkd-resume-1"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be trusted or read; names the file."""


class ResumeCheckpoint(Callback):
    """Save the whole training state to ``path`` after each epoch; restore it on start.

    ``key`` identifies the run's settings and data (the caller's hash): a checkpoint with
    another key belongs to another run and is not resumed from.
    """

    def __init__(
        self,
        path: str | Path,
        key: str,
        *,
        model: nn.Module,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
        best: BestCheckpoint,
    ):
        self.path, self.key = Path(path), key
        self.model, self.method = model, method
        self.optimizer, self.scheduler = optimizer, scheduler
        self.generator, self.best = generator, best
        self.history: list[dict[str, float]] = []

    def read(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is none for this key."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(
                f"{self.path}: not a cmkd checkpoint, refused without running it "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]}); delete it to start over"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{self.path}: not a cmkd checkpoint ({FORMAT}); delete it")
        return state if state.get("key") == self.key else None

    def restore(self) -> tuple[int, list[dict[str, float]]]:
        """Load the saved state into the run's objects; return the epoch to start at and the
        history so far (``1`` and ``[]`` without a checkpoint for this key)."""
        state = self.read()
        if state is None:
            return 1, []
        device = next(self.model.parameters()).device
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        self.best.best_value = state["best_value"]
        self.best.best_epoch = state["best_epoch"]
        best_state = state["best_state"]
        self.best.state = (
            {k: v.to(device) for k, v in best_state.items()} if best_state is not None else None
        )
        self.history = list(state["history"])
        return int(state["epoch"]) + 1, list(self.history)

    def on_epoch_end(self, record: dict[str, float], model: nn.Module) -> None:
        self.history.append(record)
        device = next(self.model.parameters()).device
        state = {
            "format": FORMAT,
            "key": self.key,
            "epoch": int(record["epoch"]),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best_value": self.best.best_value,
            "best_epoch": self.best.best_epoch,
            "best_state": self.best.state,
            "history": self.history,
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
            with open(tmp, "rb") as handle:  # on disk before the rename makes it the one
                os.fsync(handle.fileno())


def saved_epoch(path: str | Path, key: str) -> int | None:
    """The last epoch saved in the checkpoint at ``path`` for ``key``: a run started now
    resumes at the next one. ``None`` when there is none to resume from: no file, a file of
    other settings (another key), or one that cannot be read (:meth:`ResumeCheckpoint.read`
    then says why)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != key:
        return None
    return int(state["epoch"])

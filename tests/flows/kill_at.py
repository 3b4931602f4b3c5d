"""``cmkd ARGS`` with a SIGKILL planted at one exact point of one training run, so a kill
schedule can be replayed: ``python kill_at.py RUN EPOCH WHERE cmkd-args...``.

``RUN`` is a checkpoint's name (``distill-ce``), ``EPOCH`` the epoch, ``WHERE`` one of
``saved`` (right after that epoch's checkpoint is on disk), ``evaluate`` (inside that epoch's
validation pass) or ``write`` (half-way through writing that epoch's checkpoint to its
temporary file). The process kills itself with SIGKILL, as ``kill -9`` would: no handler,
no clean-up runs.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from cmkd_core.distill import resume, train

RUN, EPOCH, WHERE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
current = {"run": "", "epoch": 0}  # the run being trained and the epoch in progress


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def here(where: str) -> bool:
    return where == WHERE and current["run"] == RUN and current["epoch"] == EPOCH


real_restore = resume.ResumeCheckpoint.restore
real_epoch_end = resume.ResumeCheckpoint.on_epoch_end
real_predict = train.predict_logits
real_save = torch.save


def restore(self):
    start, history = real_restore(self)
    current.update(run=self.path.stem, epoch=start)
    return start, history


def on_epoch_end(self, record, model):
    real_epoch_end(self, record, model)
    if here("saved"):
        die()
    current["epoch"] = int(record["epoch"]) + 1


def predict_logits(model, samples, batch_size=512):
    if here("evaluate"):
        die()
    return real_predict(model, samples, batch_size)


def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if here("write") and isinstance(obj, dict) and obj.get("format") == resume.FORMAT:
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])  # torn, as a kill mid-write leaves it
        die()


resume.ResumeCheckpoint.restore = restore
resume.ResumeCheckpoint.on_epoch_end = on_epoch_end
train.predict_logits = predict_logits
torch.save = save

if __name__ == "__main__":
    from cmkd_app.cli import main

    sys.exit(main(sys.argv[4:]))

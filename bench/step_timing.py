"""What the step-timing benchmarks share (bench/distill.py and bench/distill_sections.py): a
device-synchronised median timer, a student and method with its own batch drawer, and the
table-and-JSON writer."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from cmkd_core.bank import TeacherBank
from cmkd_core.data import write_text_atomic
from cmkd_core.data.samplers import ClassMatchedSampler
from cmkd_core.data.tensors import samples_of
from cmkd_core.distill.loop import train_step
from cmkd_core.distill.methods import Batch, create_method
from cmkd_core.recipes import new_model, student_spec


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(call, repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median wall milliseconds of ``call()`` over ``repeats`` calls after ``warmup``."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class Setup:
    """A student, its optimiser and a batch drawer for ``method`` on ``device``."""

    def __init__(self, params, student, bank: TeacherBank, method: str, device, batch_size: int):
        self.params, self.device = params, device
        self.train = samples_of(student, student.rows("train"), bank.classes).to(device)
        self.model = new_model(student_spec(student, bank, params), self.train, device, 0)
        self.method = create_method(method, params, bank).to(device)
        weights = [p for p in [*self.model.parameters(), *self.method.parameters()]]
        self.optimizer = torch.optim.AdamW(
            [w for w in weights if w.requires_grad], lr=params.lr, weight_decay=params.weight_decay
        )
        self.bank_train = torch.nonzero(bank.split("train")).flatten()
        self.sampler = ClassMatchedSampler(bank.labels[self.bank_train], len(bank.classes))
        self.features = bank.features.to(device)
        self.generator = torch.Generator().manual_seed(0)
        self.batch_size = batch_size

    def draw(self, teacher_rows=None) -> Batch:
        """A batch of ``batch_size`` student clips and class-matched teacher rows (or what
        ``teacher_rows(rows)`` makes of the bank row indices)."""
        index = torch.randint(len(self.train), (self.batch_size,), generator=self.generator)
        inputs, labels = self.train.take(index)
        rows = self.bank_train[self.sampler.draw(labels.cpu(), self.generator)]
        self.last_rows = rows
        teacher = self.features[rows.to(self.device)] if teacher_rows is None else None
        return Batch(inputs, labels, teacher if teacher_rows is None else teacher_rows(rows))

    def step(self, batch: Batch) -> dict:
        return train_step(
            self.model,
            lambda b: self.method(self.model, b),
            batch,
            self.optimizer,
            None,
            self.params.grad_clip,
        )


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(out: Path, name: str, payload: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.json", json.dumps(payload, indent=1) + "\n")
    write_text_atomic(out / f"{name}.md", table)
    print(table, flush=True)


# --- OT solvers -------------------------------------------------------------------------

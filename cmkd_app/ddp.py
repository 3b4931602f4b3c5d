"""The distill stage over several processes: ``torchrun --nproc-per-node N -m cmkd_app.ddp``.

Every process reads ``params.yaml``, the bank (``data/teacher/bank.safetensors``) and the
prepared student data (``data/prepared/student``) of ``--root``, exactly as the ``distill``
stage does, and trains one student together with the others
(:func:`cmkd_core.recipes.fit_student` with
:func:`cmkd_core.distill.ddp.train_classifier_ddp`): ``distill.batch_size`` is the global batch,
so the result equals the single-process stage up to float rounding (dropout aside). Backend
gloo on the CPU, nccl with one GPU per process when CUDA is there and ``distill.device`` allows
it. Rank 0 writes the student and its history where the stage writes them
(``data/distill/student_<method>.safetensors``, ``history_<method>.json``), atomically, unless
``--out`` / ``--history`` say otherwise. Without torchrun it runs as a group of one.

    torchrun --nproc-per-node 2 -m cmkd_app.ddp --method joint
    python -m torch.distributed.run --nproc-per-node 2 -m cmkd_app.ddp --out /tmp/s.safetensors
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from cmkd_core.bank import load_bank
from cmkd_core.config import load_params
from cmkd_core.data import check_dataset
from cmkd_core.distill import resolve_device
from cmkd_core.distill.ddp import train_classifier_ddp
from cmkd_core.recipes import fit_student
from tasks.layout import Layout
from tasks.train import write_student


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m cmkd_app.ddp", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--params", type=Path, help="params file (default ROOT/params.yaml)")
    parser.add_argument("--method", help="distillation method (default distill.method)")
    parser.add_argument("--out", type=Path, help="student weights (default: the stage's path)")
    parser.add_argument("--history", type=Path, help="history JSON (default: the stage's path)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def init_distributed(device_name: str) -> torch.device:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``), or form a group of one without it; return this rank's
    device: ``cuda:LOCAL_RANK`` with backend nccl when ``device_name`` is ``auto`` or ``cuda``
    and CUDA is available, else the CPU with backend gloo."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    """Train one student across the process group; rank 0 writes it. Returns the exit code."""
    args = parse_args(argv)
    layout = Layout(args.root)
    params = load_params(args.params or layout.params).distill
    method = args.method or params.method
    device = init_distributed(params.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        bank = load_bank(layout.bank)
        dataset = check_dataset(layout.student_data, classes=bank.classes)
        # the same data preparation on every rank; distill.batch_size is the global batch
        trainer = train_classifier_ddp
        fitted, _ = fit_student(dataset, bank, params, method, device, not args.quiet, trainer)
        if rank == 0:
            out = args.out or layout.student_weights(method)
            history = args.history or layout.history(method)
            summary = write_student(
                fitted, dataset, bank, method, device, out, history, world_size=world
            )
            print(
                f"{method} student over {world} processes: best val "
                f"{summary['val_accuracy']:.4f} at epoch {summary['best_epoch']}; wrote {out}"
            )
        dist.barrier()  # every rank finishes only once the student is on disk
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

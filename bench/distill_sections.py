"""The other sections of ``bench/distill.py``: OT solvers, bank vs teacher forward, scaling.

- ``--solvers``: on the same batches (the default student's projected features against
  class-matched bank rows), each solver's loss plus its backward pass to the features:
  POT's ``sinkhorn2`` (back-propagating through the iterations), ``sinkhorn2`` in the log
  domain, ``ot.solve`` with the envelope gradient (cmkd's solver before), and cmkd's torch
  Sinkhorn (``cmkd_core.align.sinkhorn``). ``sinkhorn2`` returns the linear part ``<T, M>``
  only, so it is compared with ``ot.solve``'s ``value_linear``; the envelope solvers with
  ``ot.solve``'s ``value``. Correct = within 1e-4 of that reference, finite gradients.
- ``--teachers``: one joint step at batch 256 with the teacher's features read from the bank
  (cmkd's way) and computed by a teacher forward pass per batch (the reference code's way), for
  the default image CNN and ones about 10x and 100x larger (wider); the loss is the same both
  ways (checked on one batch).
- ``--scaling``: step time and peak memory of ce and joint for batch 64 to 4096, and of a
  fa step at batch 256 for teacher feature sizes 32 to 2048 (bank rows mapped by a fixed random
  projection), each point in a fresh process (peak resident memory over the setup's); the
  Sinkhorn iterations used at each batch size.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import resource
import time
import warnings
from dataclasses import replace
from pathlib import Path

import ot
import torch
from step_timing import Setup, median_ms, write
from step_timing import table as markdown

from cmkd_core.align import cost_matrix
from cmkd_core.align.sinkhorn import sinkhorn_log
from cmkd_core.distill import extract_bank
from cmkd_core.models import Classifier
from cmkd_core.models.encoders import ImageCNN

warnings.filterwarnings("ignore", message="Sinkhorn did not converge")


def _solver_calls(a: torch.Tensor, reg: float, it: int) -> dict:
    """Name -> loss of a cost matrix ``(B, B)`` between uniform weights ``a (B,)``."""
    return {
        "POT sinkhorn2 (autograd)": lambda m: ot.sinkhorn2(
            a, a, m, reg, numItermax=it, stopThr=1e-7
        ),
        "POT sinkhorn2 log (autograd)": lambda m: ot.sinkhorn2(
            a, a, m, reg, method="sinkhorn_log", numItermax=it, stopThr=1e-7
        ),
        "POT solve, envelope": lambda m: (
            ot.solve(m, a, a, reg=reg, max_iter=it, tol=1e-7, grad="envelope").value
        ),
        "cmkd torch Sinkhorn, envelope": lambda m: sinkhorn_log(m, reg, it, tol=1e-7).value,
    }


def solvers(params, student, bank, device, out: Path, batches=(64, 256, 1024), repeats=10):
    """Each solver's loss and backward on the same batches, at the default reg and at 0.01."""
    rows, results = [], []
    for size in batches:
        setup = Setup(params, student, bank, "joint", device, size)
        batch = setup.draw()
        with torch.no_grad():
            x0 = setup.model.projector(setup.model.features(*batch.inputs)).float()
        y = batch.teacher_features.float()
        a = torch.full((size,), 1.0 / size, device=device)
        for reg in (params.ot.reg, 0.01):
            it = params.ot.num_iter
            ref = ot.solve(cost_matrix(x0, y), a, a, reg=reg, max_iter=it, tol=1e-7)
            linear, full = float(ref.value_linear), float(ref.value)
            calls = _solver_calls(a, reg, it)
            expectations = dict(zip(calls, (linear, linear, full, full), strict=True))
            candidates = {name: (calls[name], expectations[name]) for name in calls}
            for name, (solve, expected) in candidates.items():
                x = x0.clone().requires_grad_()

                def call(solve=solve, x=x, y=y):
                    x.grad = None
                    solve(cost_matrix(x, y)).backward()

                call()
                loss = float(solve(cost_matrix(x, y)))
                finite = bool(torch.isfinite(x.grad).all())
                ms = median_ms(call, repeats, device)
                ok = finite and abs(loss - expected) <= 1e-4
                iterations = sinkhorn_log(cost_matrix(x0, y), reg, it, tol=1e-7).iterations
                record = {
                    "batch": size,
                    "reg": reg,
                    "solver": name,
                    "ms": ms,
                    "loss": loss,
                    "reference": expected,
                    "finite_grad": finite,
                    "correct": ok,
                    "iterations_used": iterations,
                }
                results.append(record)
                print(json.dumps(record), flush=True)
    for r in results:
        same = [q for q in results if q["batch"] == r["batch"] and q["reg"] == r["reg"]]
        base = next(q["ms"] for q in same if q["solver"] == "POT solve, envelope")
        r["x_pot_solve"] = r["ms"] / base
        rows.append(
            [
                r["batch"],
                r["reg"],
                r["solver"],
                f"{r['ms']:.2f}",
                f"{r['x_pot_solve']:.2f}",
                f"{abs(r['loss'] - r['reference']):.1e}",
                "yes" if r["finite_grad"] else "NO (NaN)",
                "yes" if r["correct"] else "no",
                r["iterations_used"],
            ]
        )
    table = markdown(
        f"OT solvers: loss + backward to the features, {params.ot.num_iter} iterations at most, "
        f"cosine cost ({_device_label(device)})",
        [
            "batch",
            "reg",
            "solver",
            "ms",
            "x POT solve",
            "|loss - ref|",
            "finite grad",
            "correct",
            "iterations used",
        ],
        rows,
    )
    write(out, "distill-solvers", {"device": _device_label(device), "rows": results}, table)


# --- bank vs teacher forward ------------------------------------------------------------------


def teachers(params, teacher_ds, student, device, out: Path, size=256, steps=20):
    """A joint step with the bank against one with a teacher forward pass per batch, for
    teachers of three widths (the default, about 10x and 100x its multiply-adds)."""
    images = torch.from_numpy(teacher_ds.fixed_arrays(teacher_ds.manifest)).to(device)
    results = []
    for label, width in (("default", 32), ("~10x", 101), ("~100x", 320)):
        torch.manual_seed(0)
        teacher = Classifier(ImageCNN(8, 8, 128, width), len(teacher_ds.meta.classes))
        teacher = teacher.to(device).eval()
        params_count = sum(p.numel() for p in teacher.parameters())
        # multiply-adds per 8x8 image: two 3x3 convolutions at full size, then the projection
        macs = 64 * 9 * (width + width * 2 * width) + 2 * width * 16 * 128
        start = time.perf_counter()
        bank = extract_bank(teacher, teacher_ds, {"width": width}, device)
        bank_s = time.perf_counter() - start
        setup = Setup(params, student, bank, "joint", device, size)

        def forward(rows, teacher=teacher):
            with torch.no_grad():
                return teacher.features(images[rows.to(device)])

        # The same batch both ways gives the same loss: the bank is the teacher's output.
        probe = setup.draw()
        via_forward = replace(probe, teacher_features=forward(setup.last_rows))
        setup.model.eval()  # no dropout: the two losses see the same student features
        with torch.no_grad():
            loss_bank = float(setup.method(setup.model, probe)["loss"])
            loss_forward = float(setup.method(setup.model, via_forward)["loss"])
        setup.model.train()
        bank_ms = median_ms(lambda s=setup: s.step(s.draw()), steps, device)
        forward_ms = median_ms(lambda s=setup, f=forward: s.step(s.draw(f)), steps, device)
        record = {
            "teacher": label,
            "width_mult": width,
            "teacher_params": params_count,
            "teacher_macs": macs,
            "bank_extraction_s": bank_s,
            "step_ms_bank": bank_ms,
            "step_ms_teacher_forward": forward_ms,
            "loss_difference": abs(loss_bank - loss_forward),
        }
        results.append(record)
        print(json.dumps(record), flush=True)
    base = results[0]["step_ms_bank"]
    rows = [
        [
            r["teacher"],
            f"{r['teacher_params']:,}",
            f"{r['teacher_macs'] / 1e6:.1f}",
            f"{r['bank_extraction_s']:.1f}",
            f"{r['step_ms_bank']:.1f}",
            f"{r['step_ms_bank'] / base:.2f}",
            f"{r['step_ms_teacher_forward']:.1f}",
            f"{r['step_ms_teacher_forward'] / base:.2f}",
            f"{r['loss_difference']:.1e}",
        ]
        for r in results
    ]
    table = markdown(
        f"Joint step at batch {size}: teacher rows from the bank vs a teacher forward per batch "
        f"({_device_label(device)})",
        [
            "teacher",
            "parameters",
            "M multiply-adds / image",
            "bank extraction s (once)",
            "step ms, bank",
            "x default",
            "step ms, forward",
            "x default bank",
            "|loss bank - loss forward|",
        ],
        rows,
    )
    write(out, "distill-teachers", {"device": _device_label(device), "rows": results}, table)


# --- scaling ---------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _point(queue, device_name: str, method: str, size: int, dim: int | None, steps: int):
    """One scaling point in a fresh process: median step ms and peak memory over the setup's."""
    from default_pair import setup

    device = torch.device(device_name)
    params, _, student, bank = setup(device_name)
    if dim is not None:  # the bank's rows mapped to ``dim`` features by a fixed projection
        gen = torch.Generator().manual_seed(0)
        projection = torch.randn(bank.features.shape[1], dim, generator=gen) / math.sqrt(dim)
        bank = replace(
            bank,
            features=bank.features @ projection,
            head_weight=torch.zeros(len(bank.classes), dim),
        )
    setup = Setup(params, student, bank, method, device, size)
    batches = [setup.draw() for _ in range(steps + 1)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _rss_mib()
    iterator = iter(batches)
    ms = median_ms(lambda: setup.step(next(iterator)), steps, device, warmup=1)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    )
    iterations = None
    if method != "ce":
        with torch.no_grad():
            b = batches[0]
            x = setup.model.projector(setup.model.features(*b.inputs)).float()
            m = cost_matrix(x, b.teacher_features.float(), params.ot.cost)
            iterations = sinkhorn_log(m, params.ot.reg, params.ot.num_iter).iterations
    queue.put({"ms": ms, "peak_mib": peak, "iterations": iterations})


def _in_fresh_process(*args) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_point, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def scaling(params, device, out: Path, batches=(64, 256, 1024, 4096), dims=(32, 128, 512, 2048)):
    """Step time and peak memory by batch size (ce, joint) and by teacher feature size (fa)."""
    results = []
    for size in batches:
        steps = 10 if size <= 1024 else 4
        for method in ("ce", "joint"):
            r = _in_fresh_process(device.type, method, size, None, steps)
            results.append({"axis": "batch", "method": method, "batch": size, "dim": 128, **r})
            print(json.dumps(results[-1]), flush=True)
    for dim in dims:
        r = _in_fresh_process(device.type, "fa", 256, dim, 10)
        results.append({"axis": "feature size", "method": "fa", "batch": 256, "dim": dim, **r})
        print(json.dumps(results[-1]), flush=True)
    rows = []
    for r in results:
        same = [q for q in results if q["axis"] == r["axis"] and q["method"] == r["method"]]
        rows.append(
            [
                r["axis"],
                r["method"],
                r["batch"],
                r["dim"],
                f"{r['ms']:.1f}",
                f"{r['ms'] / same[0]['ms']:.1f}",
                f"{r['peak_mib']:.0f}",
                "-" if r["iterations"] is None else r["iterations"],
            ]
        )
    table = markdown(
        f"Step time and peak memory by batch size and teacher feature size "
        f"({_device_label(device)}; memory: "
        f"{'peak allocated' if device.type == 'cuda' else 'peak resident growth over setup'})",
        [
            "axis",
            "method",
            "batch",
            "teacher dim",
            "step ms",
            "x first row",
            "peak MiB",
            "Sinkhorn iterations",
        ],
        rows,
    )
    write(out, f"distill-scaling-{device.type}", {"rows": results}, table)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run(args, device: torch.device) -> int:
    """Run the sections ``args`` asks for."""
    from default_pair import setup

    params, teacher_ds, student, bank = setup(args.device)
    out = Path(args.out)
    if args.solvers:
        solvers(params, student, bank, device, out)
    if args.teachers:
        teachers(params, teacher_ds, student, device, out)
    if args.scaling:
        scaling(params, device, out)
    return 0

"""Cost of one distillation step against one CE-only step, by batch size, on CPU or CUDA.

    python bench/distill.py [--device cpu|cuda] [--batches 64 256 1024] [--steps 20]
    python bench/distill.py --solvers      # OT solvers side by side on the same batches
    python bench/distill.py --teachers     # the bank against a teacher forward per batch
    python bench/distill.py --scaling      # batch 64..4096 and feature size: time, memory

The data is the embedded default (spoken-digit MFCCs as the student, the digits teacher's bank,
from the benchmark's bank cache or trained once). Each batch of B is drawn with replacement from
the student's train split, its teacher rows class-matched from the bank, and built before the
clock starts; the step timed is the training loop's own (``train_step``: loss terms, backward,
clipping, AdamW, schedule), the device synchronised after each. Reports the median step time,
the joint/CE ratio measured in the same run, the time to build a batch (the loading share),
peak device memory, and on CUDA the share of the step the GPU is busy (kernel time over wall
time, from the profiler). Semi-supervised methods (``sinkhorn_ssl``, ``fixmatch``) also get an
unlabelled batch of B clips, drawn from the train split, as weak and strong views, at a step
past their warm-up; their cost is compared with CE's per sample processed (2B per step, B for
the others). Prints a table and writes ``distill-DEVICE.json`` and ``.md``.

The other sections (``bench/distill_sections.py``) write ``distill-solvers``,
``distill-teachers`` and ``distill-scaling`` ``.json``/``.md`` the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from default_pair import setup  # noqa: E402
from step_timing import sync  # noqa: E402

from cmkd_core.data import write_text_atomic  # noqa: E402
from cmkd_core.data.augment import views_for  # noqa: E402
from cmkd_core.data.samplers import ClassMatchedSampler  # noqa: E402
from cmkd_core.data.tensors import samples_of  # noqa: E402
from cmkd_core.distill.loop import train_step, warmup_cosine  # noqa: E402
from cmkd_core.distill.methods import Batch, create_method  # noqa: E402
from cmkd_core.recipes import new_model, student_spec  # noqa: E402


def measure(method_name, params, student, bank, batch_size, steps, device, profile=False) -> dict:
    """Median seconds of ``steps`` training steps of ``method_name`` at ``batch_size``."""
    train = samples_of(student, student.rows("train"), bank.classes).to(device)
    spec = student_spec(student, bank, params)
    model = new_model(spec, train, device, params.seed)
    method = create_method(method_name, params, bank).to(device)
    views = None
    if method.uses_views:
        norm = model.encoder.norm
        views = views_for(train.kind, norm.mean, norm.std)
    late = params.ssl.start + params.ssl.ramp  # the unlabelled term at full weight
    weights = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(weights, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10_000, 100))
    bank_train = torch.nonzero(bank.split("train")).flatten()
    sampler = ClassMatchedSampler(bank.labels[bank_train], len(bank.classes))
    features = bank.features.to(device)
    generator = torch.Generator().manual_seed(0)

    def draw() -> Batch:
        index = torch.randint(len(train), (batch_size,), generator=generator)
        inputs, labels = train.take(index)
        rows = bank_train[sampler.draw(labels.cpu(), generator)]
        batch = Batch(inputs, labels, teacher_features=features[rows.to(device)], step=late)
        if views is not None:
            plain = train.take(torch.randint(len(train), (batch_size,), generator=generator))[0]
            batch.unlabelled = views.weak(plain, generator)
            batch.unlabelled_strong = views.strong(plain, generator)
        return batch

    load = []
    batches = []
    for _ in range(steps + 3):
        sync(device)
        start = time.perf_counter()
        batches.append(draw())
        sync(device)
        load.append(time.perf_counter() - start)
    model.train()
    clip = params.grad_clip
    amp = params.amp == "bf16" or (params.amp == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, batch in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        train_step(model, lambda b: method(model, b), batch, optimizer, scheduler, clip, amp)
        sync(device)
        if i >= 3:  # the first steps warm up allocators and kernels
            times.append(time.perf_counter() - start)
    samples = batch_size * (2 if views is not None else 1)
    result = {
        "step_ms": 1000 * statistics.median(times),
        "samples_per_step": samples,
        "us_per_sample": 1e6 * statistics.median(times) / samples,
        "load_ms": 1000 * statistics.median(load[3:]),
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else None,
    }
    if profile and device.type == "cuda":
        result["gpu_busy"] = gpu_busy(model, method, batches[3:], optimizer, scheduler, params)
    return result


def gpu_busy(model, method, batches, optimizer, scheduler, params) -> float:
    """Share of wall time the GPU spends in kernels over ``batches`` steps (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for batch in batches:
            train_step(
                model, lambda b: method(model, b), batch, optimizer, scheduler, params.grad_clip
            )
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernel_us = sum(
        e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
    )
    return kernel_us / 1e6 / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--methods", nargs="+", default=["ce", "joint", "sinkhorn_ssl", "fixmatch"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--solvers", action="store_true", help="OT solvers side by side")
    parser.add_argument("--teachers", action="store_true", help="bank vs teacher forward")
    parser.add_argument("--scaling", action="store_true", help="batch and feature size")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.solvers or args.teachers or args.scaling:
        import distill_sections

        return distill_sections.run(args, device)
    distill, _, student, bank = setup(args.device)
    rows = []
    for size in args.batches:
        base = None
        for name in args.methods:
            r = measure(name, distill, student, bank, size, args.steps, device, profile=True)
            base = base or r
            ratios = {
                "ratio_to_ce": r["step_ms"] / base["step_ms"],
                "per_sample_ratio_to_ce": r["us_per_sample"] / base["us_per_sample"],
            }
            rows.append({"method": name, "batch": size, **r, **ratios})
            print(json.dumps(rows[-1]), flush=True)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    table = (
        f"Device: {label} (torch {torch.__version__}, {threads} CPU threads)\n\n"
        "| method | batch | samples/step | step ms | x CE step | us/sample | x CE per sample "
        "| batch build ms | peak MiB | GPU busy |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        busy = f"{100 * r['gpu_busy']:.0f}%" if "gpu_busy" in r else "-"
        table += (
            f"| {r['method']} | {r['batch']} | {r['samples_per_step']} | {r['step_ms']:.2f} "
            f"| {r['ratio_to_ce']:.2f} | {r['us_per_sample']:.1f} "
            f"| {r['per_sample_ratio_to_ce']:.2f} "
            f"| {r['load_ms']:.2f} | {peak} | {busy} |\n"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"device": label, "torch": torch.__version__, "threads": threads, "rows": rows}
    write_text_atomic(out / f"distill-{args.device}.json", json.dumps(payload, indent=1) + "\n")
    write_text_atomic(out / f"distill-{args.device}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

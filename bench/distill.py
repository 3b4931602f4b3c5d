"""Cost of one distillation step against one CE-only step, by batch size, on CPU or CUDA.

    python bench/distill.py [--device cpu|cuda] [--batches 64 256 1024] [--rounds 6] [--steps 10]
    python bench/distill.py --solvers      # OT solvers side by side on the same batches
    python bench/distill.py --teachers     # the bank against a teacher forward per batch
    python bench/distill.py --scaling      # batch 64..4096 and feature size: time, memory

The data is the embedded default (spoken-digit MFCCs as the student, the digits teacher's bank,
from the benchmark's bank cache or trained once). Each batch of B is drawn with replacement from
the student's train split, its teacher rows class-matched from the bank, and built before the
clock starts; the step timed is the training loop's own (``train_step``: loss terms, backward,
clipping, AdamW, schedule), the device synchronised after each. The methods take turns in one
process: each gets 3 warm-up steps, then ``--rounds`` rounds of ``--steps`` steps each, the order
rotated every round (A B C, B C A, ...), so that no method carries the process's warm-up or
always runs first or last. Reports the median step time, the ratio to CE (the median over
rounds of the ratio of the two round-median step times, and its range over rounds), the time
to build a batch (the loading share),
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


class Timed:
    """One method's model, optimiser and prebuilt batches at one batch size, stepped on demand,
    so that several methods can take turns on the same process (interleaved rounds)."""

    def __init__(self, method_name, params, student, bank, batch_size, count, device):
        train = samples_of(student, student.rows("train"), bank.classes).to(device)
        spec = student_spec(student, bank, params)
        self.name, self.device, self.params = method_name, device, params
        self.model = new_model(spec, train, device, params.seed)
        self.method = create_method(method_name, params, bank).to(device)
        views = None
        if self.method.uses_views:
            norm = self.model.encoder.norm
            views = views_for(train.kind, norm.mean, norm.std)
        late = params.ssl.start + params.ssl.ramp  # the unlabelled term at full weight
        weights = [p for p in [*self.model.parameters(), *self.method.parameters()]]
        weights = [p for p in weights if p.requires_grad]
        self.optimizer = torch.optim.AdamW(weights, lr=params.lr, weight_decay=params.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(10_000, 100)
        )
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
                plain = train.take(torch.randint(len(train), (batch_size,), generator=generator))
                batch.unlabelled = views.weak(plain[0], generator)
                batch.unlabelled_strong = views.strong(plain[0], generator)
            return batch

        self.batches, self.load = [], []
        for _ in range(count):
            sync(device)
            start = time.perf_counter()
            self.batches.append(draw())
            sync(device)
            self.load.append(time.perf_counter() - start)
        self.samples = batch_size * (2 if views is not None else 1)
        self.done = 0
        self.amp = params.amp == "bf16" or (params.amp == "auto" and device.type == "cuda")

    def steps(self, n: int) -> list[float]:
        """Seconds of each of ``n`` more training steps (the loop's ``train_step``), cycling
        through the prebuilt batches, the device synchronised around each."""
        self.model.train()
        times = []
        for _ in range(n):
            batch = self.batches[self.done % len(self.batches)]
            self.done += 1
            sync(self.device)
            start = time.perf_counter()
            train_step(
                self.model,
                lambda b: self.method(self.model, b),
                batch,
                self.optimizer,
                self.scheduler,
                self.params.grad_clip,
                self.amp,
            )
            sync(self.device)
            times.append(time.perf_counter() - start)
        return times


def peak_mib(runner: Timed) -> float | None:
    """CUDA: the peak memory allocated over two more steps of ``runner`` (the other methods'
    models and batches, resident meanwhile, included); ``None`` on the CPU."""
    if runner.device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(runner.device)
    runner.steps(2)
    return torch.cuda.max_memory_allocated(runner.device) / 2**20


def interleaved(runners: list[Timed], rounds: int, steps: int, warmup: int = 3) -> dict:
    """Every runner's ``warmup`` steps first (a shared warm-up), then ``rounds`` rounds in each
    of which every runner takes ``steps`` steps, the order rotated one place a round (A B C,
    B C A, ...), so that none always runs first. Returns per runner its step times and the
    median step time of each round."""
    for runner in runners:
        runner.steps(warmup)
    times = {r.name: [] for r in runners}
    per_round = {r.name: [] for r in runners}
    for k in range(rounds):
        for runner in runners[k % len(runners) :] + runners[: k % len(runners)]:
            taken = runner.steps(steps)
            times[runner.name] += taken
            per_round[runner.name].append(statistics.median(taken))
    return {"times": times, "per_round": per_round}


def ratio_facts(per_round: list[float], base: list[float]) -> dict:
    """The median over rounds of a method's round-median step time over the baseline's in the
    same round, and the lowest and highest of those ratios."""
    ratios = [a / b for a, b in zip(per_round, base, strict=True)]
    return {
        "ratio_to_ce": statistics.median(ratios),
        "ratio_low": min(ratios),
        "ratio_high": max(ratios),
    }


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
    parser.add_argument("--steps", type=int, default=10, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
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
    names = ["ce", *(m for m in args.methods if m != "ce")]  # the baseline, once
    for size in args.batches:
        runners = [Timed(name, distill, student, bank, size, args.steps, device) for name in names]
        found = interleaved(runners, args.rounds, args.steps)
        base = runners[0]
        for runner in runners:
            times, per_round = found["times"][runner.name], found["per_round"][runner.name]
            step = statistics.median(times)
            ratio = ratio_facts(per_round, found["per_round"][base.name])
            per_sample = [
                (a / runner.samples) / (b / base.samples)
                for a, b in zip(per_round, found["per_round"][base.name], strict=True)
            ]
            r = {
                "method": runner.name,
                "batch": size,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "step_ms": 1000 * step,
                "samples_per_step": runner.samples,
                "us_per_sample": 1e6 * step / runner.samples,
                **ratio,
                "per_sample_ratio_to_ce": statistics.median(per_sample),
                "load_ms": 1000 * statistics.median(runner.load),
                "peak_mib": peak_mib(runner),
            }
            if device.type == "cuda":
                r["gpu_busy"] = gpu_busy(
                    runner.model,
                    runner.method,
                    runner.batches,
                    runner.optimizer,
                    runner.scheduler,
                    runner.params,
                )
            rows.append(r)
            print(json.dumps(rows[-1]), flush=True)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    table = (
        f"Device: {label} (torch {torch.__version__}, {threads} CPU threads)\n\n"
        f"Interleaved: {args.rounds} rounds of {args.steps} steps per method after 3 warm-up "
        "steps each, the order rotated every round; x CE is the median over rounds of the "
        "ratio of round-median step times, with its range over rounds.\n\n"
        "| method | batch | samples/step | step ms | x CE step (range) | us/sample "
        "| x CE per sample | batch build ms | peak MiB | GPU busy |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        busy = f"{100 * r['gpu_busy']:.0f}%" if "gpu_busy" in r else "-"
        table += (
            f"| {r['method']} | {r['batch']} | {r['samples_per_step']} | {r['step_ms']:.2f} "
            f"| {r['ratio_to_ce']:.2f} ({r['ratio_low']:.2f}-{r['ratio_high']:.2f}) "
            f"| {r['us_per_sample']:.1f} "
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

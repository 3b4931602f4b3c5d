"""Two gloo processes on the CPU train what one process trains with the same global batch.

Real data: the default pair's spoken-digit student (100 labelled clips) and a bank extracted
from the digit-image teacher dataset by a freshly initialised (seeded) image CNN. Dropout is
switched off in both runs: its masks are drawn per rank (see cmkd_core.distill.ddp).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cmkd_core.bank import load_bank, save_bank
from cmkd_core.config import DistillParams
from cmkd_core.data import check_pair
from cmkd_core.data.tensors import samples_of
from cmkd_core.distill import TrainSettings, extract_bank, train_classifier
from cmkd_core.distill.batches import BatchSource
from cmkd_core.distill.ddp import (
    DistributedSetupError,
    ShardedClassifier,
    averaged_gradients,
    check_global_batch,
    shard_sizes,
    train_classifier_ddp,
)
from cmkd_core.distill.methods import Batch, create_method
from cmkd_core.recipes import new_model, split_samples, student_spec

WORLD = 2
METHODS = ("joint", "ce")
# Tolerances. Slice-wise encoding and the summed gradients only reorder float32 additions:
# gradients agree to ~6e-7 (of up to ~1.7), losses and metrics to ~2.4e-7. AdamW divides by
# sqrt(v), so rounding in a near-zero gradient component moves that weight's update by a
# fraction of lr; after 12 steps at lr 1e-2 weights agree to ~1.6e-5 (they moved by ~6e-2).
GRAD_ATOL = 1e-6
ATOL = 1e-5  # loss terms, validation metrics
WEIGHT_ATOL = 1e-4  # 1% of one AdamW step at lr 1e-2
PARAMS = DistillParams(
    feature_dim=16,
    unlabelled=True,  # joint also aligns unlabelled clips: an odd batch of 25, slices 13 + 12
    unlabelled_batch_size=25,
    grad_clip=1.0,
    device="cpu",
)
SETTINGS = TrainSettings(
    epochs=3,  # 12 steps
    batch_size=32,  # 100 labelled clips: batches of 32, 32, 32, 4
    lr=1e-2,
    weight_decay=0.05,
    warmup_epochs=0,
    seed=0,
    grad_clip=PARAMS.grad_clip,
    progress=False,
    unlabelled_batch_size=PARAMS.unlabelled_batch_size,
)


def _setup(root: Path, bank_path: Path, name: str, settings: TrainSettings = SETTINGS):
    """The student, the method and train_classifier's arguments, as every process builds them."""
    prepared = root / "data" / "prepared"
    _, student = check_pair(prepared / "teacher", prepared / "student")
    bank = load_bank(bank_path)
    cpu = torch.device("cpu")
    data = split_samples(student, bank.classes, cpu, labelled_only=True)
    rest = student.rows("train")
    unlabelled = samples_of(student, rest[~rest["id"].isin(student.labelled_ids)], bank.classes)
    model = new_model(student_spec(student, bank, PARAMS), data["train"], cpu, PARAMS.seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    method = create_method(name, PARAMS, bank)
    batches = BatchSource(data["train"], method, settings, bank=bank, unlabelled=unlabelled)
    args = (model, method, batches, data["val"], settings)
    return args, {"desc": name}


def _one_batch(args, extra) -> Batch:
    """A fixed global batch: 32 labelled clips, class-matched bank rows, 25 unlabelled clips."""
    batches = args[2]  # of a method with a teacher: its bank rows and class-matched sampler
    train, unlabelled = batches.train, batches.unlabelled
    features, bank_train = batches.bank_features, batches.bank_train
    gen = torch.Generator().manual_seed(3)
    index = torch.randperm(len(train), generator=gen)[:32]
    inputs, labels = train.take(index)
    rows = bank_train[batches.sampler.draw(labels, gen)]
    batch = Batch(inputs, labels, features[rows])
    batch.unlabelled = unlabelled.take(torch.randperm(len(unlabelled), generator=gen)[:25])[0]
    batch.unlabelled_teacher = features[bank_train[:25]]
    return batch


def _slice(batch: Batch, rank: int) -> Batch:
    """Rank ``rank``'s contiguous slice of every row-indexed field of ``batch``."""
    labelled = shard_sizes(len(batch.labels), WORLD)
    unlabelled = shard_sizes(len(batch.unlabelled_teacher), WORLD)

    def part(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return t[sum(sizes[:rank]) : sum(sizes[: rank + 1])]

    return Batch(
        tuple(part(t, labelled) for t in batch.inputs),
        part(batch.labels, labelled),
        part(batch.teacher_features, labelled),
        tuple(part(t, unlabelled) for t in batch.unlabelled),
        part(batch.unlabelled_teacher, unlabelled),
    )


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, root: Path, bank_path: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        report: dict = {}
        args, extra = _setup(root, bank_path, "joint")  # one step's gradients
        model, method = args[0], args[1]
        with averaged_gradients([model, method]):
            method(ShardedClassifier(model), _one_batch(args, extra))["loss"].backward()
        report["grads"] = _grads(model)
        model.zero_grad()  # control: each rank's loss on its own slice, gradients averaged
        with averaged_gradients([model, method]):
            method(model, _slice(_one_batch(args, extra), rank))["loss"].backward()
        report["sliced_grads"] = _grads(model)
        for name in METHODS:
            args, extra = _setup(root, bank_path, name)
            result = train_classifier_ddp(*args, **extra)
            report[name] = {"history": result.history, "state": args[0].state_dict()}
            report[name]["best_epoch"] = result.best_epoch
        odd = TrainSettings(**{**SETTINGS.__dict__, "batch_size": 33})
        report["error"] = "no error raised"
        try:
            train_classifier_ddp(*_setup(root, bank_path, "ce", odd)[0])
        except DistributedSetupError as exc:
            report["error"] = str(exc)
        torch.save(report, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(pair_root, tmp_path_factory):
    """Rank reports of the two-process run, and the single-process reference."""
    tmp = tmp_path_factory.mktemp("ddp")
    prepared = pair_root / "data" / "prepared"
    teacher, _ = check_pair(prepared / "teacher", prepared / "student")
    spec = {"model": "image_cnn", "sample_shape": [8, 8], "feature_dim": 24, "num_classes": 10}
    samples = samples_of(teacher, teacher.rows("train"))
    bank_path = tmp / "bank.safetensors"
    teacher_model = new_model(spec, samples, torch.device("cpu"), 0)
    save_bank(extract_bank(teacher_model, teacher, {}), bank_path)

    # fork: the workers inherit the imported modules (spawn re-imports torch and POT: ~20 s)
    args = (_free_port(), pair_root, bank_path, tmp)
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="fork")
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference: dict = {}
        args, extra = _setup(pair_root, bank_path, "joint")
        args[1](args[0], _one_batch(args, extra))["loss"].backward()
        reference["grads"] = _grads(args[0])
        for name in METHODS:
            args, extra = _setup(pair_root, bank_path, name)
            init = {k: v.clone() for k, v in args[0].state_dict().items()}
            result = train_classifier(*args, **extra)
            reference[name] = {"history": result.history, "state": args[0].state_dict()}
            reference[name].update(init=init, best_epoch=result.best_epoch)
    finally:
        torch.set_num_threads(threads)
    return ranks, reference


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_one_step_gradient_equals_single_process(runs):
    ranks, reference = runs
    names = set(reference["grads"])
    assert any(k.startswith("encoder.") for k in names) and "projector.weight" in names
    for report in ranks:  # the global batch's loss (OT over all 32 + 25 rows), one backward
        assert _max_diff(report["grads"], reference["grads"]) < GRAD_ATOL
        # Control: naive sharding (each rank's loss on its slice, gradients averaged) optimises
        # another objective, since OT and LA over a batch are not means over its rows.
        assert _max_diff(report["sliced_grads"], reference["grads"]) > 1e-4  # measured 4e-3


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_train_what_one_process_trains(runs, name):
    ranks, reference = runs
    ref = reference[name]
    assert len(ref["history"]) == SETTINGS.epochs
    # Every epoch's validation loss and accuracy, after all of its steps, must match; the
    # weights compared below are those of the best validation epoch, the same in both runs.
    terms = ("loss", "ce", "fa", "la", "fa_unlabelled") if name == "joint" else ("loss", "ce")
    for report in ranks:
        got = report[name]
        for mine, theirs in zip(got["history"], ref["history"], strict=True):
            for term in (*terms, "val_loss", "val_accuracy", "lr"):
                assert mine[term] == pytest.approx(theirs[term], abs=ATOL), (name, term)
        assert got["best_epoch"] == ref["best_epoch"]
        assert _max_diff(got["state"], ref["state"]) < WEIGHT_ATOL
    # Both ranks hold the same weights after every averaged step.
    assert _max_diff(ranks[0][name]["state"], ranks[1][name]["state"]) == 0.0
    # Training moved the weights: the equality is not that of two untouched initialisations.
    assert _max_diff(ref["state"], ref["init"]) > 1e-3


def test_indivisible_global_batch_is_refused_naming_both_numbers(runs):
    ranks, _ = runs
    for report in ranks:
        assert "global batch size 33 is not divisible by world size 2" in report["error"]
    with pytest.raises(DistributedSetupError, match=r"global batch size 10 .* world size 4"):
        check_global_batch(10, 4)
    assert check_global_batch(32, 2) == 16
    assert shard_sizes(25, 2) == [13, 12]
    with pytest.raises(DistributedSetupError, match=r"batch of 2 rows .* world size 3"):
        shard_sizes(2, 3)


def test_training_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(DistributedSetupError, match="initialised process group"):
        train_classifier_ddp(None, None, None, None, SETTINGS)  # type: ignore[arg-type]

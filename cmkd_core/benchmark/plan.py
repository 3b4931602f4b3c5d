"""The method benchmark: methods x pairs x labelled budgets x seeds, trained in memory.

Every method of a cell sees the same splits, the same labelled samples (drawn per seed), the
same epochs and the same selection rule (best validation accuracy); test is read once per run.
Each teacher is trained once per pair and banked. Control runs repeat a method against a
changed bank: ``shuffled`` (the teacher's classes moved by a fixed permutation: its geometry
kept, its class semantics destroyed) and ``random_prototypes`` (each class's bank rows replaced
by one random unit vector: the teacher's geometry gone, class proportions kept). ``auto`` is not
trained: its record is the candidate (:mod:`cmkd_core.distill.auto`) with the best validation
accuracy among the grid's runs of the same cell and seed, which is what the distill stage's
``auto`` computes from the same runs (:mod:`cmkd_core.benchmark.summary`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cmkd_core.align.measure import alignment, class_geometry
from cmkd_core.align.outlook import verdict
from cmkd_core.bank import TeacherBank
from cmkd_core.config import DataParams, DistillParams, TeacherParams
from cmkd_core.data.contract import ModalityDataset
from cmkd_core.data.defaults import image_dataset, labelled_subset, mnist_pair
from cmkd_core.data.fsdd import default_student
from cmkd_core.data.unseen import withhold
from cmkd_core.distill import accuracy_of, extract_bank, predict_logits
from cmkd_core.distill.auto import base_method
from cmkd_core.distill.methods import method_class
from cmkd_core.metrics import classification_report, seen_unseen
from cmkd_core.recipes import fit_student, fit_teacher, unlabelled_outlook
from cmkd_core.teachers import bank_from_vectors

PAIRS = ("digits->fsdd", "mnist->digits8x8", "mnist->mnist8x8", "text->fashion")


def pair_missing(name: str) -> str | None:
    """Why pair ``name`` cannot run here (one line), or ``None`` when it can."""
    if name == "text->fashion":
        from cmkd_core.data.fashion import missing

        return missing()
    return None


@dataclass(frozen=True)
class Grid:
    """What to run. ``budgets`` are labelled samples per class (``None``: the whole train
    split); ``controls`` are the methods also run against the class-shuffled teacher."""

    pairs: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[int | None, ...]
    seeds: tuple[int, ...]
    controls: tuple[str, ...]
    distill: DistillParams
    teacher: TeacherParams
    prototype_controls: tuple[str, ...] = ()
    """Methods also run against random class prototypes (:func:`random_prototype_bank`)."""
    unlabelled_classes: int = 0
    """Classes of each pair's student left without any label, drawn per seed
    (cmkd_core/data/unseen.py); 0: every class has labels. Such a grid runs unpaired only."""


def in_memory(name: str, meta, manifest, arrays, labelled=None) -> ModalityDataset:
    ids = frozenset(labelled) if labelled is not None else None
    return ModalityDataset(Path(f"<{name}>"), meta, manifest.reset_index(drop=True), arrays, ids)


def load_pair(
    name: str, data: DataParams, seed: int = 0
) -> tuple[ModalityDataset, ModalityDataset]:
    """Teacher and student datasets of pair ``name`` (one of :data:`PAIRS`), 60/20/20 splits
    stratified by class, except the spoken digits: the recordings at ``data.recordings``
    through ``data.front_end``, split by speaker as the default is."""
    if name == "digits->fsdd":
        teacher = in_memory("digits", *image_dataset(0.2, 0.2, seed))
        meta, manifest, arrays, _ = default_student(
            data.recordings, data.front_end, data.seed, None, data.val_speaker, data.test_speaker
        )
        return teacher, in_memory("fsdd", meta, manifest, arrays)
    if name in ("mnist->digits8x8", "mnist->mnist8x8"):
        which = "sklearn_digits8x8" if name.endswith("digits8x8") else "derived_mnist8x8"
        teacher, student = mnist_pair(which, 0.2, 0.2, seed)
        return in_memory("mnist", *teacher), in_memory(which, *student)
    if name == "text->fashion":
        from cmkd_core.data.fashion import fashion_images
        from cmkd_core.text import DEFAULT_MODEL, fashion_texts, load_text_encoder

        encoder = load_text_encoder(DEFAULT_MODEL)
        teacher = in_memory("fashion-texts", *fashion_texts(encoder, 0.2, 0.2, seed))
        return teacher, in_memory("fashion", *fashion_images(0.2, 0.2, seed))
    raise KeyError(f"unknown pair {name!r}; valid pairs: {', '.join(PAIRS)}")


def build_bank(teacher_ds: ModalityDataset, params: TeacherParams) -> tuple[TeacherBank, float]:
    """Train the teacher (selected on val) and bank it; returns the bank and test accuracy.
    A teacher dataset of text embeddings is banked as it is, with a fitted linear head."""
    if teacher_ds.meta.modality == "text":
        bank, accuracy = bank_from_vectors(teacher_ds)
        return bank, accuracy["test"]
    fitted, data = fit_teacher(teacher_ds, params, torch.device("cpu"), progress=False)
    accuracy = accuracy_of(fitted.model, data["test"])
    info = {"test_accuracy": accuracy, "val_accuracy": fitted.result.best_val_accuracy}
    return extract_bank(fitted.model, teacher_ds, info), accuracy


def shuffled_bank(bank: TeacherBank) -> TeacherBank:
    """The control teacher: class ``c`` relabelled ``(c + 1) mod C`` (every class moves), its
    head's rows moved with it, so the teacher is as confident but about the wrong classes."""
    num = len(bank.classes)
    perm = (torch.arange(num) + 1) % num
    weight, bias = torch.empty_like(bank.head_weight), torch.empty_like(bank.head_bias)
    weight[perm], bias[perm] = bank.head_weight, bank.head_bias
    return replace(bank, labels=perm[bank.labels], head_weight=weight, head_bias=bias)


def random_prototype_bank(bank: TeacherBank, seed: int = 0) -> TeacherBank:
    """The control teacher without geometry: every bank row of class ``c`` becomes the same
    random unit vector ``v_c`` (scaled to the bank's mean row norm); labels, class proportions
    and head are kept."""
    gen = torch.Generator().manual_seed(seed + 104729)
    vectors = torch.nn.functional.normalize(
        torch.randn(len(bank.classes), bank.features.shape[1], generator=gen), dim=1
    )
    scale = bank.features.float().norm(dim=1).mean()
    features = (vectors[bank.labels] * scale).to(bank.features.dtype)
    return replace(bank, features=features)


CONTROLS = ("", "shuffled", "random_prototypes")


def with_budget(
    dataset: ModalityDataset, per_class: int | None, seed: int, unlabelled_classes: int = 0
) -> ModalityDataset:
    """The same dataset with ``per_class`` labelled train samples per class drawn with ``seed``,
    and no label at all for ``unlabelled_classes`` classes (drawn with ``seed`` too)."""
    labels = dataset.labels(dataset.manifest)
    mask = labelled_subset(labels, dataset.manifest["split"].to_numpy(), per_class, seed)
    labelled = list(dataset.manifest.loc[mask, "id"])
    meta, labelled = withhold(dataset.meta, dataset.manifest, labelled, unlabelled_classes, seed)
    return replace(dataset, meta=meta, labelled_ids=frozenset(labelled))


@dataclass(frozen=True)
class Run:
    """One training run of the grid; ``index`` orders the records as the grid lists them."""

    index: int
    pair: str
    budget: int | None
    seed: int
    pairing: str
    method: str
    control: str

    @property
    def label(self) -> str:
        """What the Prefect UI calls the run: pair, pairing, budget, method, control, seed."""
        budget = "all" if self.budget is None else self.budget
        control = f"+{self.control}" if self.control else ""
        return f"{self.pair} {self.pairing} b{budget} {self.method}{control} s{self.seed}"


def teacher_key(dataset: ModalityDataset, params: TeacherParams) -> str:
    """A hash of what decides a trained teacher: its params, manifest and arrays. Pairs that
    share a teacher dataset share the key, hence one training."""
    digest = hashlib.sha256(params.model_dump_json(exclude={"threads"}).encode())
    digest.update(dataset.manifest.to_csv(index=False).encode())
    for name in sorted(dataset.arrays):
        digest.update(dataset.arrays[name].tobytes())
    return digest.hexdigest()


def plan(grid: Grid, pairings: dict[str, tuple[str, ...]]) -> list[Run]:
    """Every run of ``grid`` in table order; ``pairings`` gives each pair's pairing modes."""
    runs: list[Run] = []
    for pair in grid.pairs:
        for budget in grid.budgets:
            for seed in grid.seeds:
                for pairing in pairings[pair]:
                    for method, control in _runs(grid, pairing):
                        runs.append(Run(len(runs), pair, budget, seed, pairing, method, control))
    return runs


def run_one(
    run: Run,
    student: ModalityDataset,
    bank: TeacherBank,
    distill: DistillParams,
    unlabelled_classes: int = 0,
) -> dict:
    """Train the student of ``run`` on CPU against ``bank`` (already shuffled for a control) and
    return its record: test accuracy and macro-F1, selection facts, seconds, alignment; with
    ``unlabelled_classes``, also the accuracy on the classes with and without labels and H."""
    data = with_budget(student, run.budget, run.seed, unlabelled_classes)
    model = "sequence_cnn" if student.meta.kind == "sequence" else "image_cnn"
    params = distill.model_copy(update={"seed": run.seed, "pairing": run.pairing, "model": model})
    start = time.perf_counter()
    fitted, split = fit_student(data, bank, params, run.method, torch.device("cpu"), progress=False)
    seconds = time.perf_counter() - start
    test = split["test"]
    pred = predict_logits(fitted.model, test).argmax(1).numpy()
    report = classification_report(test.labels.numpy(), pred, len(bank.classes))
    geometry = {}
    if run.method == "ce" and not run.control:  # the diagnostic needs a student without teacher
        found = class_geometry(fitted.model, bank, data)
        geometry = {"similarity_r": found["correlation"], "similarity_p": found["p_value"]}
    return {
        "pair": run.pair,
        "pairing": run.pairing,
        "budget": "all" if run.budget is None else run.budget,
        "seed": run.seed,
        "method": run.method,
        "control": run.control,
        "test_accuracy": report["accuracy"],
        "test_macro_f1": report["macro_f1"],
        "val_accuracy": fitted.result.best_val_accuracy,
        "best_epoch": fitted.result.best_epoch,
        "seconds": seconds,
        **alignment(fitted.model, bank, data),
        **geometry,
        **_unseen_facts(fitted, data, bank, test.labels.numpy(), pred),
    }


def _unseen_facts(fitted, data: ModalityDataset, bank: TeacherBank, y_true, y_pred) -> dict:
    """What a run with classes that had no label adds to its record (``{}`` otherwise)."""
    if not data.unlabelled_classes:
        return {}
    hidden = [bank.classes.index(c) for c in data.unlabelled_classes]
    return {
        "unlabelled_classes": list(data.unlabelled_classes),
        "classes_predicted": int(fitted.result.best_record["val_pool_classes"]),
        **{f"test_{k}": v for k, v in seen_unseen(y_true, y_pred, hidden).items()},
    }


def grid_outlook(grid: Grid, student: ModalityDataset, bank: TeacherBank) -> dict | None:
    """With classes left without labels, the check before training
    (:func:`~cmkd_core.recipes.unlabelled_outlook`) for each budget and seed of ``grid`` (each
    draws its own classes): ``r`` per ``"b<budget> s<seed>"``, their mean ``r_mean`` and its
    verdict; ``None`` when every class has labels."""
    if not grid.unlabelled_classes:
        return None
    found = {
        f"b{budget or 'all'} s{seed}": unlabelled_outlook(
            with_budget(student, budget, seed, grid.unlabelled_classes), bank
        )["correlation"]
        for budget in grid.budgets
        for seed in grid.seeds
    }
    mean = float(sum(found.values()) / len(found))
    return {"r": found, "r_mean": mean, "verdict": verdict(mean)}


def control_bank(bank: TeacherBank, control: str) -> TeacherBank:
    """The bank a run with ``control`` (one of :data:`CONTROLS`) trains against."""
    if control == "shuffled":
        return shuffled_bank(bank)
    if control == "random_prototypes":
        return random_prototype_bank(bank)
    if control:
        raise KeyError(f"unknown control {control!r}; valid: {', '.join(CONTROLS[1:])}")
    return bank


@dataclass
class Work:
    """What a grid still has to do, and what it had done: each distinct teacher's dataset (by
    :func:`teacher_key`; the largest, the longest to train, first), the recorded runs by
    index, per pair the runs to train (the longest budgets first) and its student dataset."""

    teacher_sets: dict[str, ModalityDataset]
    key_of_pair: dict[str, str]
    records: dict[int, dict]
    todo: dict[str, list[Run]]
    students: dict[str, ModalityDataset]

    def pairs_of(self, key: str) -> list[str]:
        """The pairs that share the teacher ``key``."""
        return [pair for pair, k in self.key_of_pair.items() if k == key]


def prepare(grid: Grid, data: DataParams, done: Iterable[dict] = ()) -> Work:
    """Load every pair of ``grid`` and sort its runs into done (a record in ``done`` with the
    same pair, pairing, budget, seed, method and control) and to do."""
    students: dict[str, ModalityDataset] = {}
    teacher_sets: dict[str, ModalityDataset] = {}
    key_of_pair: dict[str, str] = {}
    for pair in grid.pairs:
        teacher_ds, students[pair] = load_pair(pair, data)
        key_of_pair[pair] = teacher_key(teacher_ds, grid.teacher)
        teacher_sets.setdefault(key_of_pair[pair], teacher_ds)
    pairings = {  # classes without labels: the setting without pairs only (issue 25)
        pair: ("unpaired", "paired")
        if "pair" in ds.manifest and not grid.unlabelled_classes
        else ("unpaired",)
        for pair, ds in students.items()
    }
    previous = {_key_of(r): r for r in done}
    records: dict[int, dict] = {}
    todo: dict[str, list[Run]] = {pair: [] for pair in grid.pairs}
    for run in plan(grid, pairings):
        if _key_of(run) in previous:
            records[run.index] = previous[_key_of(run)]
        else:
            todo[run.pair].append(run)
    for runs in todo.values():
        runs.sort(key=lambda r: (r.budget is not None, -(r.budget or 0)))
    by_size = sorted(teacher_sets, key=lambda key: -_size(teacher_sets[key]))
    return Work({key: teacher_sets[key] for key in by_size}, key_of_pair, records, todo, students)


def _size(dataset: ModalityDataset) -> int:
    return sum(int(a.size) for a in dataset.arrays.values())


def _key_of(item: Run | dict) -> tuple:
    """What identifies a run across files: pair, pairing, budget, seed, method, control."""
    if isinstance(item, Run):
        budget = "all" if item.budget is None else item.budget
        return item.pair, item.pairing, budget, item.seed, item.method, item.control
    return tuple(item[k] for k in ("pair", "pairing", "budget", "seed", "method", "control"))


def _runs(grid: Grid, pairing: str) -> Iterable[tuple[str, str]]:
    for method in grid.methods:
        if method == "auto":
            continue  # derived from its candidates' runs (cmkd_core.benchmark.summary.with_auto)
        cls = method_class(base_method(method))
        if cls.needs_pairs and pairing != "paired":
            continue  # paired-only baselines refuse unpaired data (tested separately)
        if pairing == "paired" and not cls.needs_teacher:
            continue  # teacher-free students do not depend on pairing: run once, unpaired
        yield method, ""
        if method in grid.controls and (pairing == "unpaired" or cls.needs_pairs):
            yield method, "shuffled"
        if method in grid.prototype_controls and pairing == "unpaired":
            yield method, "random_prototypes"


def record_line(r: dict) -> str:
    """One run's record as the benchmark prints it."""
    tag = f"{r['method']}{'+' + r['control'] if r['control'] else ''}"
    return (
        f"  {r['pair']:<17} {r['pairing']:<8} budget={r['budget']!s:<4} seed={r['seed']} "
        f"{tag:<30} test_acc={r['test_accuracy']:.4f} ({r['seconds']:.1f}s)"
    )

"""End-to-end recipes for one modality dataset: fit a teacher, fit a student.

They choose nothing the params do not say: the model comes from the registry, inputs are
standardised with train-split statistics only, selection is on the val split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cmkd_core.align.outlook import input_outlook, outlook_line
from cmkd_core.bank import TeacherBank, restrict_bank
from cmkd_core.config import DistillParams, TeacherParams
from cmkd_core.data.augment import compose, make_view, views_for
from cmkd_core.data.contract import ModalityDataset
from cmkd_core.data.presets import domain_shift, preset
from cmkd_core.data.samplers import stratified_subset
from cmkd_core.data.tensors import Samples, samples_of, training_frames
from cmkd_core.distill.auto import VARIANTS
from cmkd_core.distill.batches import BatchSource
from cmkd_core.distill.methods import create_method, method_class
from cmkd_core.distill.train import (
    ClassPrior,
    TrainResult,
    TrainSettings,
    seed_everything,
    train_classifier,
    validation_record,
)
from cmkd_core.models import Classifier
from cmkd_core.models.checkpoint import build_classifier


@dataclass
class Fitted:
    """A trained classifier, the spec that rebuilds it, and its training record."""

    model: Classifier
    spec: dict
    result: TrainResult


def split_samples(
    dataset: ModalityDataset,
    classes: tuple[str, ...],
    device: torch.device,
    labelled_only: bool = False,
) -> dict[str, Samples]:
    """``{"train", "val", "test"}`` samples on ``device``; ``labelled_only`` restricts train to
    the ids in ``labelled.csv``."""
    return {
        split: samples_of(
            dataset, dataset.rows(split, labelled_only and split == "train"), classes
        ).to(device)
        for split in ("train", "val", "test")
    }


def new_model(spec: dict, train: Samples, device: torch.device, seed: int) -> Classifier:
    """A freshly initialised classifier (seeded) with train-split input statistics."""
    seed_everything(seed)
    model = build_classifier(spec)
    model.encoder.norm.fit(training_frames(train.to("cpu")))
    return model.to(device)


def student_spec(dataset: ModalityDataset, bank: TeacherBank, params: DistillParams) -> dict:
    """The student's model spec: its encoder on ``dataset``'s samples, the bank's classes and a
    projector to the bank's feature size."""
    return {
        "model": params.model,
        "sample_shape": list(dataset.meta.sample_shape),
        "feature_dim": params.feature_dim,
        "num_classes": len(bank.classes),
        "align_dim": int(bank.features.shape[1]),
    }


def train_settings(
    params: TeacherParams | DistillParams,
    progress: bool,
    checkpoint: tuple[str, str] | None = None,
    **more,
) -> TrainSettings:
    """The optimiser and schedule of a teacher or student run from its params section;
    ``checkpoint`` = ``(path, key)``; ``more``: further :class:`TrainSettings` fields."""
    if checkpoint is not None:
        more.update(checkpoint=str(checkpoint[0]), checkpoint_key=checkpoint[1])
    return TrainSettings(
        params.epochs,
        params.batch_size,
        params.lr,
        params.weight_decay,
        params.warmup_epochs,
        params.seed,
        progress=progress,
        **more,
    )


def fit_teacher(
    dataset: ModalityDataset,
    params: TeacherParams,
    device: torch.device,
    progress: bool = True,
    checkpoint: tuple[str, str] | None = None,
) -> tuple[Fitted, dict[str, Samples]]:
    """Train the teacher with cross-entropy on its train split, selected on val.
    ``checkpoint`` = ``(path, key)`` saves the training state each epoch and resumes from it
    (:mod:`cmkd_core.distill.resume`)."""
    classes = dataset.meta.classes
    data = split_samples(dataset, classes, device)
    spec = {
        "model": params.model,
        "sample_shape": list(dataset.meta.sample_shape),
        "feature_dim": params.feature_dim,
        "num_classes": len(classes),
        "align_dim": None,
    }
    method = method_class("ce")(label_smoothing=params.label_smoothing)
    settings = train_settings(params, progress, checkpoint)
    model = new_model(spec, data["train"], device, params.seed)
    batches = BatchSource(data["train"], method, settings)
    result = train_classifier(model, method, batches, data["val"], settings, desc="teacher")
    return Fitted(model, spec, result), data


def unlabelled_samples(
    dataset: ModalityDataset, bank: TeacherBank, paired: bool, device: torch.device
) -> Samples:
    """The train samples outside ``labelled.csv``, on ``device``; ``paired``: with the bank
    rows of their pairs (``pair_index``)."""
    train = dataset.rows("train")
    if dataset.labelled_ids is not None:
        train = train[~train["id"].isin(dataset.labelled_ids)]
    unlabelled = samples_of(dataset, train, bank.classes).to(device)
    if paired and len(train):
        unlabelled.pair_index = bank.rows_of(list(train["pair"]), str(dataset.root)).to(device)
    return unlabelled


def selection(
    dataset: ModalityDataset,
    bank: TeacherBank,
    device: torch.device,
    val: Samples,
    unlabelled: Samples | None = None,
) -> tuple[Samples, ClassPrior | None]:
    """What a student is selected on. Every class labelled: the ``val`` samples. Some classes
    without labels (``dataset.unlabelled_classes``): the val samples of the labelled classes
    only, and the prior of the bank's class proportions over the unlabelled train samples
    (``unlabelled`` when the run has them already; no label of theirs is read: which val sample
    is of an unlabelled class is all that is used)."""
    hidden = set(dataset.unlabelled_classes) & set(bank.classes)
    if not hidden:
        return val, None
    rows = dataset.rows("val")
    shown = samples_of(dataset, rows[~rows["label"].isin(hidden)], bank.classes).to(device)
    pool = (
        unlabelled if unlabelled is not None else unlabelled_samples(dataset, bank, False, device)
    )
    return shown, ClassPrior(pool, bank.class_proportions())


def unlabelled_outlook(dataset: ModalityDataset, bank: TeacherBank) -> dict | None:
    """When some classes of ``dataset`` have no label, the check before training
    (:func:`~cmkd_core.align.outlook.input_outlook` on the labelled train samples and the val
    samples of the labelled classes) with its printable ``line``; ``None`` otherwise."""
    hidden = [bank.classes.index(c) for c in dataset.unlabelled_classes if c in bank.classes]
    if not hidden:
        return None
    seen = [  # the labelled train samples and the val samples; the test split is not read
        samples_of(dataset, dataset.rows(split, labelled_only=split == "train"), bank.classes)
        for split in ("train", "val")
    ]
    found = input_outlook(bank, seen, hidden)
    return {**found, "line": outlook_line(found, [bank.classes[i] for i in hidden])}


def fit_student(
    dataset: ModalityDataset,
    bank: TeacherBank,
    params: DistillParams,
    method: str,
    device: torch.device,
    progress: bool = True,
    trainer: Callable[..., TrainResult] = train_classifier,
    checkpoint: tuple[str, str] | None = None,
) -> tuple[Fitted, dict[str, Samples]]:
    """Train a student with ``method`` (a registered method or a variant of
    :data:`cmkd_core.distill.auto.VARIANTS`) on the labelled train samples, selected on val.

    The student's class indices follow the bank's class list. ``params.pairing`` chooses
    class-matched (unpaired) or instance-paired teacher rows; ``params.robustness`` thins the
    bank and perturbs the training inputs (train split only); ``params.unlabelled`` adds the
    unlabelled train samples to feature alignment; methods that learn from unlabelled samples
    get them whenever there are some (with their pairs, when paired), as weak and strong views
    if they ask for views. ``params.augment`` picks the view of the labelled batches.
    ``trainer`` runs the training (the data-parallel one:
    :func:`~cmkd_core.distill.ddp.train_classifier_ddp`); ``checkpoint`` as for
    :func:`fit_teacher`.
    """
    name = method
    method, params = resolve(name, params)
    cls = method_class(method)
    data = split_samples(dataset, bank.classes, device, labelled_only=True)
    if params.pairing == "paired":
        if "pair" not in dataset.manifest.columns:
            raise ValueError(f"{dataset.root}: pairing 'paired' needs a 'pair' column")
        rows = dataset.rows("train", labelled_only=True)
        data["train"].pair_index = bank.rows_of(list(rows["pair"]), str(dataset.root)).to(device)
    robustness = preset(params.robustness)
    if params.pairing == "paired" and robustness != preset("clean"):
        raise ValueError("robustness presets apply to unpaired runs only")
    bank = restrict_bank(bank, robustness, params.seed)
    unlabelled = None
    if params.unlabelled or cls.uses_unlabelled:
        unlabelled = unlabelled_samples(dataset, bank, params.pairing == "paired", device)
    spec = student_spec(dataset, bank, params)
    model = new_model(spec, data["train"], device, params.seed)
    kind = data["train"].kind
    norm = model.encoder.norm
    shift = None
    if robustness.shift_level is not None:
        shift = domain_shift(robustness.shift_level, norm.std)
    view = (
        None if params.augment == "none" else make_view(kind, params.augment, norm.mean, norm.std)
    )
    augment = compose(shift, view)
    views = views_for(kind, norm.mean, norm.std) if cls.uses_views else None
    settings = train_settings(
        params,
        progress,
        checkpoint,
        grad_clip=params.grad_clip,
        unlabelled_batch_size=params.unlabelled_batch_size,
        min_steps=params.min_steps,
        amp=params.amp == "bf16" or (params.amp == "auto" and torch.device(device).type == "cuda"),
    )
    learner = create_method(method, params, bank)
    batches = BatchSource(
        data["train"],
        learner,
        settings,
        bank=bank,
        pairing=params.pairing,
        unlabelled=unlabelled,
        augment=augment,
        views=views,
        desc=name,
    )
    val, prior = selection(dataset, bank, device, data["val"], unlabelled)
    each_val, each_prior = round_subsets(val, prior, params.val_subset, params.seed)
    extra = {} if each_prior is None else {"prior": each_prior}
    result = trainer(model, learner, batches, each_val, settings, desc=name, **extra)
    if each_val is not val or each_prior is not prior:  # the chosen round, on everything
        full = validation_record(model, val, prior)
        result.best_val_accuracy = full["val_accuracy" if prior is None else "val_score"]
        result.full_validation = full
    return Fitted(model, spec, result), data


def round_subsets(
    val: Samples, prior: ClassPrior | None, size: int | None, seed: int
) -> tuple[Samples, ClassPrior | None]:
    """What each round validates on (``distill.val_subset``): at most ``size`` of ``val``,
    stratified by class, and of the prior's unlabelled pool a uniform draw (its labels are not
    read); each unchanged when it is no larger."""
    if size is None:
        return val, prior
    if len(val) > size:
        val = val.subset(stratified_subset(val.labels, size, seed))
    if prior is not None and len(prior.pool) > size:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.sort(torch.randperm(len(prior.pool), generator=generator)[:size]).values
        prior = ClassPrior(prior.pool.subset(keep), prior.proportions)
    return val, prior


def resolve(name: str, params: DistillParams) -> tuple[str, DistillParams]:
    """The registered method behind ``name`` and the params it trains with (a variant's
    overrides applied); an unknown name raises ``KeyError`` listing the valid ones."""
    if name in VARIANTS:
        method, overrides = VARIANTS[name]
        update = {  # a nested section (ssl, ot) keeps its other values
            key: getattr(params, key).model_copy(update=value) if isinstance(value, dict) else value
            for key, value in overrides.items()
        }
        return method, params.model_copy(update=update)
    method_class(name)  # raises with the list of registered methods
    return name, params

"""Tasks of the ``teacher`` and ``distill`` stages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from cmkd_core.bank import BankError, TeacherBank, load_bank, save_bank
from cmkd_core.config import DistillParams, TeacherParams
from cmkd_core.data import (
    ModalityDataset,
    check_dataset,
    leftover_temporaries,
    read_dataset,
    sha256_file,
)
from cmkd_core.distill import accuracy_of, extract_bank, resolve_device
from cmkd_core.distill.auto import candidates, choose, students_of
from cmkd_core.distill.resume import saved_epoch
from cmkd_core.models.checkpoint import load_classifier, save_classifier
from cmkd_core.recipes import Fitted, fit_student, fit_teacher, unlabelled_outlook
from cmkd_core.teachers import (
    bank_from_embeddings,
    bank_from_module,
    bank_from_onnx,
    bank_from_vectors,
)
from cmkd_core.tensorfile import save_tensors
from tasks.data import write_json
from tasks.layout import Layout
from tasks.resumed import add_to_note
from tasks.timing import computing


def _checkpoint(layout: Layout, name: str, params: TeacherParams | DistillParams) -> tuple:
    """Where the run ``name`` checkpoints, and its key: the stage's parameters and the data's
    digests, so that a checkpoint of other settings or data is never resumed from."""
    report = json.loads(layout.validation_report.read_text())
    identity = {
        "run": name,
        "params": params.model_dump(mode="json"),
        "data": {role: report[role]["sha256"] for role in ("teacher", "student")},
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    path = layout.checkpoint(name)
    for stale in leftover_temporaries(path):  # a kill mid-write left it
        stale.unlink(missing_ok=True)
    return str(path), key


def note_resume(
    layout: Layout, stage: str, run: str, checkpoint: tuple[str, str], epochs: int
) -> None:
    """If ``checkpoint`` (``_checkpoint``'s path and key) holds a saved epoch for these settings,
    log that training run ``run`` resumes after it and note it for the stage's line in ``cmkd
    run`` (tasks/resumed.py; under ``.cmkd``, never in an output)."""
    saved = saved_epoch(*checkpoint)
    if saved is None:
        return
    add_to_note(layout.root, stage, run, saved + 1, epochs)
    get_run_logger().info(
        "%s: resumed from its checkpoint, at epoch %d of %d%s",
        run,
        saved + 1,
        epochs,
        " (it had finished)" if saved >= epochs else "",
    )


def clear_checkpoints(layout: Layout, stage: str) -> None:
    """Delete the stage's resume checkpoints once all its outputs are written. Until then a
    finished method's checkpoint stays, so a stage killed later resumes it at its last epoch
    (DVC deletes the stage's outputs before running it again)."""
    folder = layout.checkpoint(stage).parent
    for path in [*folder.glob(f"{stage}*.pt"), *leftover_temporaries(folder / f"{stage}*.pt")]:
        path.unlink(missing_ok=True)


@task(name="train-teacher", cache_policy=NONE)
def train_teacher(layout: Layout, params: TeacherParams) -> dict:
    """Train the teacher, extract the bank, write weights, bank and metrics."""
    logger = get_run_logger()
    torch.set_num_threads(params.threads)
    dataset = check_dataset(layout.teacher_data)
    if params.source != "train":
        return _given_teacher(layout, params, dataset)
    device = resolve_device(params.device)
    checkpoint = _checkpoint(layout, "teacher", params)
    note_resume(layout, "teacher", "teacher", checkpoint, params.epochs)
    with computing("training"):
        fitted, data = fit_teacher(dataset, params, device, checkpoint=checkpoint)
    # Reported for information only; selection used val.
    metrics = {
        "best_epoch": fitted.result.best_epoch,
        "val_accuracy": fitted.result.best_val_accuracy,
        "test_accuracy": accuracy_of(fitted.model, data["test"]),
        "device": str(device),
    }
    info = {"dataset": dataset.meta.name, "modality": dataset.meta.modality, **metrics}
    bank = extract_bank(fitted.model, dataset, info, device)
    save_classifier(fitted.model, fitted.spec, layout.teacher_weights, info)
    save_bank(bank, layout.bank)
    write_json(layout.teacher_metrics, {**metrics, "history": fitted.result.history})
    logger.info("teacher: val %.4f test %.4f", metrics["val_accuracy"], metrics["test_accuracy"])
    return metrics


def _given_teacher(layout: Layout, params: TeacherParams, dataset) -> dict:
    """The bank from a teacher the user brings (``teacher.source``); ``teacher.safetensors``
    then records the head and where the teacher came from (there are no trained weights).
    ``teacher.embeddings`` naming a folder (``data/import/teacher``) means the teacher dataset's
    own samples are the embeddings; ``teacher.model`` and the training settings are unused.
    ``text``: the teacher dataset is the embedded texts, the head is fitted on them."""
    root = layout.root
    if params.source == "onnx":
        path = root / params.onnx
        bank, accuracy = bank_from_onnx(path, dataset, params.feature_output, params.logits_output)
    elif params.source == "torch":
        path = root / params.weights
        bank, accuracy = bank_from_module(params.module, path, dataset, params.module_kwargs)
    elif params.source == "text":  # the prepare stage embedded teacher.texts: fit the head
        path = dataset.root / dataset.manifest["file"].iloc[0]
        bank, accuracy = bank_from_vectors(dataset)
    else:
        path = root / params.embeddings
        if path.is_dir():  # the teacher dataset itself: its (d,) samples are the embeddings
            named = path / "manifest.csv"
            own = (dataset.root / "manifest.csv").read_bytes()
            if not named.is_file() or named.read_bytes() != own:
                raise BankError(
                    f"{path}: teacher.embeddings names a folder that is not the teacher dataset "
                    f"({dataset.root}); name that folder or an (N, d) .npy file"
                )
            path = dataset.root / dataset.manifest["file"].iloc[0]  # its array, for the digest
            bank, accuracy = bank_from_embeddings(None, root / params.head, dataset)
        else:
            bank, accuracy = bank_from_embeddings(path, root / params.head, dataset)
    metrics = {
        "val_accuracy": accuracy["val"],
        "test_accuracy": accuracy["test"],
        "source": params.source,
        "sha256": sha256_file(path),
    }
    bank.info.update(metrics)
    save_tensors(
        {"head_weight": bank.head_weight, "head_bias": bank.head_bias},
        layout.teacher_weights,
        {"source": params.source, "file": str(path), "sha256": metrics["sha256"]},
    )
    save_bank(bank, layout.bank)
    write_json(layout.teacher_metrics, metrics)
    get_run_logger().info(
        "%s teacher %s: val %.4f test %.4f", params.source, path, *accuracy.values()
    )
    return metrics


def write_student(
    fitted: Fitted,
    dataset: ModalityDataset,
    bank: TeacherBank,
    method: str,
    device: torch.device | str,
    weights: str | Path,
    history: str | Path,
    **extra: object,
) -> dict:
    """Write a trained student's weights (with its summary, teacher and classes) and its
    history JSON, both atomically; return the summary (``extra`` keys added to it)."""
    result = fitted.result
    summary = {
        "method": method,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.best_val_accuracy,
        "labelled_train": len(dataset.rows("train", labelled_only=True)),
        "device": str(device),
        **extra,
    }
    best = result.best_record
    if "val_score" in best:  # some classes had no label: selected on val_score, not accuracy
        summary["selected_on"] = "val_score"
        summary["val_accuracy_labelled_classes"] = best["val_accuracy"]
        summary["classes_predicted"] = int(best["val_pool_classes"])
    if result.full_validation is not None:  # rounds saw a subset (distill.val_subset)
        summary["validated_on"] = "subset each round, the whole split for the chosen round"
        summary["full_validation"] = result.full_validation
        if "val_score" in best:
            summary["val_accuracy_labelled_classes"] = result.full_validation["val_accuracy"]
    info = {**summary, "teacher": bank.info, "classes": list(bank.classes)}
    save_classifier(fitted.model, fitted.spec, weights, info)
    write_json(history, {**summary, "history": fitted.result.history})
    return summary


@task(name="distill-student", cache_policy=NONE)
def distill_student(layout: Layout, params: DistillParams, method: str) -> dict:
    """Train one student with ``method`` from the bank; write weights and history."""
    torch.set_num_threads(params.threads)
    device = resolve_device(params.device)
    bank = load_bank(layout.bank)
    dataset = check_dataset(layout.student_data, classes=bank.classes)
    checkpoint = _checkpoint(layout, f"distill-{method}", params)
    note_resume(layout, "distill", method, checkpoint, params.epochs)
    with computing("training"):
        fitted, _ = fit_student(dataset, bank, params, method, device, checkpoint=checkpoint)
    summary = write_student(
        fitted,
        dataset,
        bank,
        method,
        device,
        layout.student_weights(method),
        layout.history(method),
    )
    get_run_logger().info(
        "%s student: best val %.4f at epoch %d",
        method,
        summary["val_accuracy"],
        summary["best_epoch"],
    )
    return summary


UNLABELLED_CLASS_STEPS = 1200
"""Optimiser steps at which the benchmark's students named classes without labels (71 % and
90 % on the MNIST pairs, against 27 % and 41 % at 300; docs/results.md)."""


@task(name="unlabelled-outlook", cache_policy=NONE)
def outlook(layout: Layout, params: DistillParams) -> dict | None:
    """When some student classes have no label, log the check before training
    (:func:`~cmkd_core.recipes.unlabelled_outlook`: can the teacher be expected to name them?)
    and, with fewer ``distill.min_steps`` than the benchmark needed, say so; return the check
    (``None`` when every class has labels)."""
    if not read_dataset(layout.student_data).unlabelled_classes:
        return None  # every run passes here: no bank load, no full contract check
    bank = load_bank(layout.bank)
    found = unlabelled_outlook(check_dataset(layout.student_data, classes=bank.classes), bank)
    if found is None:
        return None
    logger = get_run_logger()
    shown = {"cmkd_line": True}  # on cmkd run's console, not only in its log file
    logger.info("%s", found["line"], extra=shown)
    if params.min_steps < UNLABELLED_CLASS_STEPS:
        logger.warning(
            "distill.min_steps is %d: classes without labels were named at %d steps in the "
            "benchmark and mostly missed at 300 (docs/results.md); raise it in params.yaml",
            params.min_steps,
            UNLABELLED_CLASS_STEPS,
            extra=shown,
        )
    return found


@task(name="plan-candidates", cache_policy=NONE)
def plan_candidates(layout: Layout, params: DistillParams) -> list[str]:
    """The students this run trains: ``auto``'s candidates (``ce`` first, ``sinkhorn_ssl``
    only with unlabelled student train samples, ``hinton_kd`` only when paired), or the
    configured method and the CE-only baseline."""
    if params.method != "auto":
        return students_of(params.method)
    dataset = check_dataset(layout.student_data)
    train = len(dataset.rows("train"))
    labelled = len(dataset.rows("train", labelled_only=True))
    return candidates(labelled < train, params.pairing == "paired")


@task(name="select-student", cache_policy=NONE)
def select_student(layout: Layout, summaries: dict[str, dict]) -> dict:
    """``auto``: keep the candidate with the best validation accuracy (ties: ``ce``) as
    ``student_auto``, its history as ``history_auto``, and the choice with every candidate's
    validation accuracy in ``selection.json``. Test data is not read. When some classes have no
    label, only the candidates that predict the most classes on the unlabelled samples (every
    class, when one does) may be chosen, by ``val_score`` (:func:`cmkd_core.recipes.selection`)."""
    scores = {name: summary["val_accuracy"] for name, summary in summaries.items()}
    chosen = choose(scores, {n: s.get("classes_predicted", 0) for n, s in summaries.items()})
    selection = {
        "method": "auto",
        "chosen": chosen,
        "candidates": scores,
        "margin_over_ce_val": scores[chosen] - scores["ce"],
    }
    model, spec, info = load_classifier(layout.student_weights(chosen))
    save_classifier(model, spec, layout.student_weights("auto"), {**info, "auto": selection})
    history = json.loads(layout.history(chosen).read_text())
    write_json(layout.history("auto"), {**history, "auto": selection})
    write_json(layout.distill_dir / "selection.json", selection)
    get_run_logger().info("auto: %s, val %.4f (ce %.4f)", chosen, scores[chosen], scores["ce"])
    return selection

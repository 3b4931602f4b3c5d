"""Tasks of the ``prepare`` and ``validate`` stages."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from cmkd_core.config import DataParams, TeacherParams, load_params
from cmkd_core.data import check_pair, sha256_file, write_dataset, write_text_atomic
from cmkd_core.data.contract import (
    LABELLED,
    SPLITS,
    DataContractError,
    ModalityDataset,
    Problem,
    read_dataset,
)
from cmkd_core.data.defaults import image_dataset, labelled_subset
from cmkd_core.data.fsdd import default_student
from cmkd_core.data.unseen import withhold
from tasks.layout import Layout


def write_json(path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@task(name="materialise-default-pair", cache_policy=NONE, retries=1)
def materialise_default_pair(layout: Layout, params: DataParams) -> dict[str, int]:
    """Write the embedded default pair (digit images -> spoken-digit recordings through the
    front end of ``params``, split by speaker) in contract form."""
    meta, manifest, arrays = image_dataset(params.val_fraction, params.test_fraction, params.seed)
    write_dataset(layout.teacher_data, meta, manifest, arrays)
    teacher_samples = len(manifest)
    meta, manifest, arrays, labelled = default_student(
        layout.root / params.recordings,
        params.front_end,
        params.seed,
        params.labelled_per_class,
        params.val_speaker,
        params.test_speaker,
    )
    meta, labelled = withhold(meta, manifest, labelled, params.unlabelled_classes, params.seed)
    write_dataset(layout.student_data, meta, manifest, arrays, labelled)
    counts = {
        "teacher_samples": teacher_samples,
        "student_samples": len(manifest),
        "student_labelled": len(labelled),
    }
    get_run_logger().info("prepared %s", counts)
    return counts


def link_or_copy(source: str, target: str) -> str:
    """Hard-link ``source`` at ``target`` (no second copy of the arrays on the disk), or copy it
    where a link cannot be made (another file system). Nothing writes into a prepared file in
    place: files are replaced whole (``write_text_atomic``), which leaves the import as it was."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


@task(name="copy-imported-pair", cache_policy=NONE, retries=1)
def copy_imported_pair(
    layout: Layout, params: DataParams, roles: tuple[str, ...] = ("teacher", "student")
) -> dict[str, int]:
    """Hard-link (or copy) the user's contract folders ``import_dir/{teacher,student}`` (those of
    ``roles``) into ``data/prepared``; a student without ``labelled.csv`` gets
    ``labelled_per_class`` labels per class drawn with ``seed``. Checking them is the
    ``validate`` stage's job."""
    source = layout.root / params.import_dir
    counts: dict[str, int] = {}
    missing = [
        Problem(str(source / role), "-", "-", "exists", "no imported dataset (manifest.csv)")
        for role in roles
        if not (source / role / "manifest.csv").is_file()
    ]
    if missing:  # before anything is copied
        raise DataContractError(missing)
    targets = {"teacher": layout.teacher_data, "student": layout.student_data}
    for role, target in ((role, targets[role]) for role in roles):
        folder = source / role
        staging = target.with_name(f".staging-{role}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging, copy_function=link_or_copy)
        if role == "student" and not (staging / LABELLED).is_file():
            manifest = pd.read_csv(staging / "manifest.csv", dtype={"id": str, "label": str})
            mask = labelled_subset(
                manifest["label"].to_numpy(),
                manifest["split"].to_numpy(),
                params.labelled_per_class,
                params.seed,
            )
            pd.DataFrame({"id": manifest.loc[mask, "id"]}).to_csv(staging / LABELLED, index=False)
            counts["student_labelled"] = int(mask.sum())
        if role == "student" and params.unlabelled_classes:
            counts["student_labelled"] = _withhold_copied(staging, params)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        counts[f"{role}_samples"] = len((target / "manifest.csv").read_text().splitlines()) - 1
    get_run_logger().info("imported %s", counts)
    return counts


def _withhold_copied(folder: Path, params: DataParams) -> int:
    """Leave the classes of ``data.unlabelled_classes`` without labels in the copied student
    ``folder`` (its ``labelled.csv`` and ``dataset.json``); the labelled count left."""
    dataset = read_dataset(folder)
    labelled = sorted(dataset.labelled_ids or [])
    meta, labelled = withhold(
        dataset.meta, dataset.manifest, labelled, params.unlabelled_classes, params.seed
    )
    write_text_atomic(folder / "dataset.json", json.dumps(meta.to_json(), indent=2) + "\n")
    write_text_atomic(folder / LABELLED, pd.DataFrame({"id": labelled}).to_csv(index=False))
    return len(labelled)


@task(name="embed-texts", cache_policy=NONE)
def texts_teacher(layout: Layout, teacher: TeacherParams, data: DataParams) -> dict[str, int]:
    """With ``teacher.source: text``: the teacher dataset ``data/prepared/teacher`` from the
    texts CSV ``teacher.texts``, embedded by ``teacher.text_model`` (:mod:`cmkd_core.text`),
    split per class with the ``data`` fractions and seed. Every label must be a class of the
    prepared student and every student class needs a text; problems name the CSV."""
    from cmkd_core.text import import_texts, load_text_encoder

    classes = read_dataset(layout.student_data).meta.classes
    encoder = load_text_encoder(teacher.text_model, layout.root)
    target = layout.teacher_data
    staging = target.with_name(".staging-teacher")
    shutil.rmtree(staging, ignore_errors=True)
    import_texts(
        layout.root / teacher.texts,
        staging,
        encoder,
        name="texts",
        model=teacher.text_model,
        classes=classes,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        seed=data.seed,
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    texts = len((target / "manifest.csv").read_text().splitlines()) - 1
    get_run_logger().info("embedded %d texts with %s", texts, teacher.text_model)
    return {"teacher_samples": texts}


def _summary(ds: ModalityDataset) -> dict:
    counts = {s: int((ds.manifest["split"] == s).sum()) for s in SPLITS}
    files = {name: sha256_file(ds.root / name) for name in sorted(ds.arrays)}
    files["manifest.csv"] = sha256_file(ds.root / "manifest.csv")
    summary = {
        "name": ds.meta.name,
        "modality": ds.meta.modality,
        "kind": ds.meta.kind,
        "sample_shape": list(ds.meta.sample_shape),
        "samples": counts,
        "sha256": files,
    }
    if ds.labelled_ids is not None:
        summary["labelled_train"] = len(ds.labelled_ids)
        summary["sha256"]["labelled.csv"] = sha256_file(ds.root / "labelled.csv")
    return summary


def _users_text(layout: Layout, text: str) -> str:
    """``text`` naming the imported folders instead of their prepared copies, when the pair
    was imported."""
    try:
        params = load_params(layout.params).data
    except ValueError:
        return text
    if params.source != "import":
        return text
    for role, prepared in (("teacher", layout.teacher_data), ("student", layout.student_data)):
        text = text.replace(str(prepared), str(layout.root / params.import_dir / role))
    return text


def _users_file(layout: Layout, problem: Problem) -> Problem:
    """``problem`` naming the imported file it was copied from, when the pair was imported."""
    file = _users_text(layout, problem.file)
    if file == problem.file:
        return problem
    return Problem(file, problem.column, problem.row, problem.check, problem.detail)


@task(name="validate-pair", cache_policy=NONE)
def validate_pair(layout: Layout) -> dict:
    """Check both datasets against the contract; write the report only if both pass.

    A violation raises :class:`cmkd_core.data.DataContractError` listing every problem by file,
    column, row and check (all of them in ``.cmkd/reports/validation-problems.txt``); the
    previous report is left as it was. With ``data.source: import`` the problems name the
    user's files in ``data.import_dir``, not the prepared copies.
    """
    try:
        pair = check_pair(layout.teacher_data, layout.student_data)
    except DataContractError as exc:
        problems = [_users_file(layout, p) for p in exc.problems]
        write_text_atomic(layout.validation_problems, "".join(f"{p}\n" for p in problems))
        raise DataContractError(problems, report=str(layout.validation_problems)) from None
    teacher, student = pair
    warnings = [_users_text(layout, warning) for warning in pair.warnings]
    for warning in warnings:
        get_run_logger().warning("%s", warning)
    report = {
        "classes": list(teacher.meta.classes),
        "teacher": _summary(teacher),
        "student": _summary(student),
        "warnings": warnings,
    }
    write_json(layout.validation_report, report)
    return report

"""Check dataset folders against the contract and report every violation at once.

The manifest is checked with a pandera ``DataFrameModel``; the arrays it points into are checked
by hand (pandera does not take raw arrays) with messages of the same shape: file, column, row,
check. Rows are 0-based data rows of ``manifest.csv`` (CSV line = row + 2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from cmkd_core.data.contract import (
    LABELLED,
    MANIFEST,
    MANIFEST_COLUMNS,
    SPLITS,
    DataContractError,
    DatasetMeta,
    ModalityDataset,
    Problem,
    load_npy,
    read_dataset,
    read_manifest,
    safe_member,
    spelling_key,
)
from cmkd_core.data.npyio import NpyRows

_log = logging.getLogger(__name__)

MAX_REPORTED = 20
"""Samples with NaN or inf named one by one in a report; the rest are counted."""


class ManifestSchema(pa.DataFrameModel):
    """Columns of ``manifest.csv``; the class list is checked separately (it is per run)."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    label: Series[str] = pa.Field(str_length={"min_value": 1})
    split: Series[str] = pa.Field(isin=list(SPLITS))
    file: Series[str] = pa.Field(str_matches=r"^[^/].*\.npy$")
    offset: Series[int] = pa.Field(ge=0)
    length: Series[int] = pa.Field(ge=1)
    pair: Series[str] | None = pa.Field(nullable=True)
    """Optional pair key: a student row and the teacher row whose id it names form a pair."""

    class Config:
        strict = True
        coerce = False


def _schema_problems(manifest: pd.DataFrame, where: str, classes: Sequence[str]) -> list[Problem]:
    problems: list[Problem] = []
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        problems.append(Problem(where, ",".join(missing), "-", "column_in_dataframe", "missing"))
        return problems
    if manifest.empty:
        return [Problem(where, "-", "-", "not_empty", "the manifest has no rows")]
    try:
        ManifestSchema.validate(manifest, lazy=True)
    except pa.errors.SchemaErrors as exc:
        for case in exc.failure_cases.itertuples():
            row = "-" if pd.isna(case.index) else str(int(case.index))
            problems.append(
                Problem(
                    where, str(case.column), row, str(case.check), f"value {case.failure_case!r}"
                )
            )
    if "label" in manifest.columns:
        bad = ~manifest["label"].isin(list(classes))
        for row, value in manifest.loc[bad, "label"].items():
            problems.append(
                Problem(where, "label", str(row), "isin(classes)", f"unknown class {value!r}")
            )
    return problems


def _array_problems(ds: ModalityDataset, where: str) -> list[Problem]:
    """Files exist and load, dtype and shape match, rows are in range, finite, not shared."""
    problems: list[Problem] = []
    meta, manifest = ds.meta, ds.manifest
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(set(manifest["file"].astype(str))):
        path = safe_member(ds.root, name)
        rows = manifest.index[manifest["file"] == name]
        first = str(rows[0])
        if path is None:
            problems.append(Problem(where, "file", first, "inside_dataset", f"{name!r} escapes"))
            continue
        try:
            array = load_npy(path)
        except (OSError, ValueError, EOFError) as exc:
            problems.append(Problem(str(path), "file", first, "loadable_npy", str(exc)))
            continue
        if array.dtype != np.float32:
            problems.append(Problem(str(path), "-", "-", "dtype", f"{array.dtype} != float32"))
            continue
        if tuple(array.shape[1:]) != meta.sample_shape:
            problems.append(
                Problem(
                    str(path),
                    "-",
                    "-",
                    "sample_shape",
                    f"array shape {tuple(array.shape)}: trailing dims must be {meta.sample_shape}",
                )
            )
            continue
        arrays[name] = array
    if problems:
        return problems
    for name, array in arrays.items():
        sub = manifest[manifest["file"] == name]
        end = sub["offset"] + sub["length"]
        for row in sub.index[end > len(array)]:
            problems.append(
                Problem(
                    where,
                    "offset",
                    str(row),
                    "within_array",
                    f"rows {sub.at[row, 'offset']}..{end[row]} past the "
                    f"{len(array)} rows of {name}",
                )
            )
        if meta.kind == "fixed":
            for row in sub.index[sub["length"] != 1]:
                problems.append(Problem(where, "length", str(row), "fixed_length_is_1", "not 1"))
        ordered = sub.sort_values("offset")
        starts, lengths = ordered["offset"].to_numpy(), ordered["length"].to_numpy()
        overlap = np.nonzero(starts[1:] < starts[:-1] + lengths[:-1])[0]
        for i in overlap:
            a, b = ordered.index[i], ordered.index[i + 1]
            problems.append(
                Problem(where, "offset", f"{a},{b}", "disjoint_rows", "samples share array rows")
            )
        finite = _finite_rows(safe_member(ds.root, name), len(array))  # type: ignore[arg-type]
        if not finite.all():
            bad_before = np.concatenate([[0], np.cumsum(~finite)])  # non-finite rows before i
            ends = np.minimum(sub["offset"] + sub["length"], len(array)).to_numpy()
            starts = np.minimum(sub["offset"].to_numpy(), ends)
            bad = sub.index[bad_before[ends] > bad_before[starts]]
            problems += finite_problems(ds.root / name, [str(r) for r in bad])
    return problems


def finite_problems(
    file: str | Path, rows: Sequence[str], total: int | None = None
) -> list[Problem]:
    """Problems for the samples ``rows`` (as printed; ``total`` of them in all, default
    ``len(rows)``) that hold NaN or inf: the first :data:`MAX_REPORTED` one by one, each with the
    total, then one problem that counts the rest."""
    total = len(rows) if total is None else total
    what = f"NaN or inf values ({total} sample{'s' if total != 1 else ''} with them in all)"
    problems = [Problem(str(file), "-", row, "finite", what) for row in rows[:MAX_REPORTED]]
    if total > len(problems):
        more = total - len(problems)
        problems.append(
            Problem(str(file), "-", "-", "finite", f"and {more} more samples like these")
        )
    return problems


def _finite_rows(path: Path, rows: int, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Boolean ``(rows,)``: whether each row of the ``.npy`` at ``path`` is all finite, read a
    chunk of about ``chunk_bytes`` at a time (so a file larger than memory can be checked)."""
    source = NpyRows(path)
    step = max(1, chunk_bytes // max(1, source.row_items * source.dtype.itemsize))
    finite = np.empty(rows, dtype=bool)
    for start, block in source.chunks(step):
        finite[start : start + len(block)] = np.isfinite(block.reshape(len(block), -1)).all(1)
    return finite


def _coverage_problems(ds: ModalityDataset, where: str, splits: Sequence[str]) -> list[Problem]:
    problems = []
    for split in splits:
        present = set(ds.manifest.loc[ds.manifest["split"] == split, "label"])
        for name in ds.meta.classes:
            if name not in present:
                problems.append(
                    Problem(
                        where,
                        "label",
                        "-",
                        f"class_in_{split}",
                        f"class {name!r} has no {split} sample",
                    )
                )
    return problems


def _labelled_problems(ds: ModalityDataset) -> list[Problem]:
    if ds.labelled_ids is None:
        return []
    where = str(ds.root / LABELLED)
    train = set(ds.manifest.loc[ds.manifest["split"] == "train", "id"])
    problems = [
        Problem(where, "id", "-", "labelled_in_train", f"id {i!r} is not a train sample")
        for i in sorted(ds.labelled_ids - train)
    ]
    if not problems:
        counts = ds.rows("train", labelled_only=True)["label"].value_counts()
        declared = set(ds.unlabelled_classes)
        for name in sorted(declared - set(ds.meta.classes)):
            where_meta = str(ds.root / "dataset.json")
            problems.append(
                Problem(where_meta, "unlabelled_classes", "-", "is_class", f"{name!r} is no class")
            )
        for name in ds.meta.classes:
            if name in declared and counts.get(name, 0):
                detail = f"{counts[name]} labelled samples of {name!r}, declared unlabelled"
                problems.append(Problem(where, "id", "-", "unlabelled_class", detail))
            elif name not in declared and not counts.get(name, 0):
                detail = f"no labelled sample of {name!r} (data.unlabelled_classes names such)"
                problems.append(Problem(where, "id", "-", "labelled_class", detail))
    return problems


def check_dataset(
    root: str | Path, classes: Sequence[str] | None = None, splits: Sequence[str] = SPLITS
) -> ModalityDataset:
    """Validate one dataset folder and return it; raise :class:`DataContractError` otherwise.

    ``classes`` is the run's class list (defaults to the dataset's own); every class must have
    a sample in each of ``splits``.
    """
    root = Path(root)
    where = str(root / MANIFEST)
    if not (root / MANIFEST).is_file():
        raise DataContractError([Problem(where, "-", "-", "exists", "manifest.csv not found")])
    ds = read_dataset(root)
    classes = tuple(classes) if classes is not None else ds.meta.classes
    problems = []
    if set(ds.meta.classes) != set(classes):
        # One violation for the class lists; rows are then checked against the dataset's own
        # list, so a class only this side has is not reported again for each of its rows.
        problems.append(_class_list_problem(str(root / "dataset.json"), ds.meta, classes))
        problems += _schema_problems(ds.manifest, where, ds.meta.classes)
    else:
        problems += _schema_problems(ds.manifest, where, classes)
    if not problems:
        problems += _array_problems(ds, where)
    if not problems:
        problems += _coverage_problems(ds, where, splits)
        problems += _labelled_problems(ds)
    if problems:
        raise DataContractError(problems)
    return ds


def _class_list_problem(where: str, meta: DatasetMeta, classes: Sequence[str]) -> Problem:
    only_here = sorted(set(meta.classes) - set(classes))
    missing = sorted(set(classes) - set(meta.classes))
    detail = f"classes missing here: {missing}; classes only here: {only_here}"
    return Problem(
        where, "classes", "-", "same_class_list", detail + _spelling_hint(only_here, missing)
    )


def _spelling_hint(only_here: Sequence[str], missing: Sequence[str]) -> str:
    """What the class names that differ only in spelling (``'0.0'`` here, ``'0'`` in the run's
    list; ``'3 '`` and ``'3'``) have in common, and the likely cause; ``""`` when none do."""
    theirs = {spelling_key(name): name for name in missing}
    pairs = [(mine, theirs[key]) for mine in only_here if (key := spelling_key(mine)) in theirs]
    if not pairs:
        return ""
    causes = []
    if any(mine.strip() != mine or other.strip() != other for mine, other in pairs):
        causes.append("surrounding whitespace (strip the labels)")
    if any(mine.strip() != other.strip() for mine, other in pairs):
        causes.append(
            "integers written as floats (a label column saved as float: write it as integers, "
            "df['label'].astype(int), and import again)"
        )
    shown = ", ".join(f"{mine!r} here is {other!r} there" for mine, other in pairs[:3])
    more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
    return (
        f"; {len(pairs)} of them differ only in spelling ({shown}{more}): likely "
        + " and ".join(causes)
    )


class CheckedPair(tuple):
    """``(teacher, student)`` as :func:`check_pair` found them (unpack it like a tuple), and
    ``warnings``: what the contract allows but the user may not have meant, one line each."""

    warnings: tuple[str, ...]

    def __new__(
        cls, teacher: ModalityDataset, student: ModalityDataset, warnings: Sequence[str] = ()
    ) -> CheckedPair:
        pair = super().__new__(cls, (teacher, student))
        pair.warnings = tuple(warnings)
        return pair


SHOWN_IDS = 5
"""Shared ids named in a warning; the rest are counted."""


def shared_id_warnings(teacher: ModalityDataset, student: ModalityDataset) -> list[str]:
    """A warning when ids are in both datasets without the student's ``pair`` naming its own
    id: the run takes the two as unrelated samples, which may not be what the user meant (two
    imports with one ``--name`` get the same default ids; pairs belong in ``pair``)."""
    manifest = student.manifest
    shared = manifest["id"].isin(set(teacher.manifest["id"]))
    if "pair" in manifest.columns:
        shared &= manifest["pair"].astype(str) != manifest["id"]
    ids = list(manifest.loc[shared, "id"])
    if not ids:
        return []
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    more = f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
    return [
        f"{len(ids)} id(s) are in both {teacher.root / MANIFEST} and {student.root / MANIFEST} "
        f"({shown}{more}): the run takes them as unrelated samples. If they are the same items "
        "seen in both modalities, give the student a 'pair' column naming each row's teacher "
        "id (docs/data.md); if not, import one side with another --name (or 'id' column)"
    ]


def check_pair(teacher_root: str | Path, student_root: str | Path) -> CheckedPair:
    """Validate both modalities and that they share one class list; report all problems.

    Returns ``(teacher, student)`` with ``warnings`` (:func:`shared_id_warnings`), each also
    logged; a violation raises :class:`DataContractError` listing every problem.
    """
    problems: list[Problem] = []
    found = []
    try:
        teacher_classes: tuple[str, ...] | None = read_dataset(teacher_root).meta.classes
    except (OSError, ValueError):
        teacher_classes = None  # check_dataset below reports why the teacher side is unreadable
    for root in (teacher_root, student_root):
        try:
            found.append(check_dataset(root, classes=teacher_classes))
        except DataContractError as exc:
            problems += exc.problems
        except (OSError, ValueError) as exc:
            problems.append(Problem(str(root), "-", "-", "readable", str(exc)))
    if problems:
        raise DataContractError(problems)
    teacher, student = found
    warnings = shared_id_warnings(teacher, student)
    for warning in warnings:
        _log.warning("%s", warning)
    return CheckedPair(teacher, student, warnings)


__all__ = [
    "CheckedPair",
    "ManifestSchema",
    "check_dataset",
    "check_pair",
    "finite_problems",
    "read_manifest",
    "shared_id_warnings",
]

"""The validate stage: the default pair passes; each kind of bad dataset is refused with a
message naming the place, and the previous report is left as it was."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmkd_core.data import DataContractError, check_dataset, check_pair
from tasks.data import validate_pair
from tasks.layout import Layout


def _copy(pair_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(pair_root, tmp_path / "project")
    layout = Layout(tmp_path / "project")
    return layout.teacher_data, layout.student_data


def _edit_manifest(root: Path, edit) -> None:
    manifest = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    for column in ("offset", "length"):
        if column in manifest:
            manifest[column] = manifest[column].astype(int)
    manifest = edit(manifest)
    manifest.to_csv(root / "manifest.csv", index=False)


def _edit_array(root: Path, name: str, edit) -> None:
    array = np.load(root / name)
    np.save(root / name, edit(array))


def test_default_pair_passes_and_the_report_is_written(pair_root, tmp_path):
    layout = Layout(pair_root)
    teacher, student = check_pair(layout.teacher_data, layout.student_data)
    assert teacher.meta.classes == student.meta.classes
    assert len(student.rows("train", labelled_only=True)) == 100
    assert student.meta.kind == "sequence" and teacher.meta.kind == "fixed"
    frames, _, lengths = student.sequence_frames(student.rows("test"))
    assert frames.shape[1] == 13 and lengths.min() >= 6 and lengths.max() <= 92
    _copy(pair_root, tmp_path)
    report = validate_pair.fn(Layout(tmp_path / "project"))
    assert report["student"]["samples"] == {"train": 2000, "val": 500, "test": 500}
    assert report["teacher"]["samples"]["train"] + report["teacher"]["samples"]["test"] > 1000
    assert json.loads((tmp_path / "project/data/validated/report.json").read_text()) == report


def _set(df, column, row, value):
    df = df.copy()
    df[column] = df[column].astype(object)
    df.at[row, column] = value
    return df


BAD_CASES = {
    # name: (side, mutation, expected fragment of the message)
    "nan_in_array": (
        "student",
        lambda s: _edit_array(s, "frames.npy", lambda a: _poison(a, np.nan)),
        r"row=0 check=finite",
    ),
    "inf_in_array": (
        "teacher",
        lambda t: _edit_array(t, "images.npy", lambda a: _poison(a, np.inf)),
        r"row=0 check=finite",
    ),
    "wrong_dtype": (
        "teacher",
        lambda t: _edit_array(t, "images.npy", lambda a: a.astype(np.float64)),
        r"images.npy .*check=dtype: float64 != float32",
    ),
    "wrong_sample_shape": (
        "student",
        lambda s: _edit_array(s, "frames.npy", lambda a: a[:, :12]),
        r"frames.npy .*check=sample_shape",
    ),
    "label_outside_class_list": (
        "student",
        lambda s: _edit_manifest(s, lambda m: _set(m, "label", 5, "eleven")),
        r"column=label row=5 check=isin\(classes\): unknown class 'eleven'",
    ),
    "duplicate_id": (
        "teacher",
        lambda t: _edit_manifest(t, lambda m: _set(m, "id", 7, m.at[3, "id"])),
        r"column=id row=(3|7) check=field_uniqueness",
    ),
    "unknown_split": (
        "student",
        lambda s: _edit_manifest(s, lambda m: _set(m, "split", 2, "holdout")),
        r"column=split row=2 check=isin",
    ),
    "row_past_the_array": (
        "student",
        lambda s: _edit_manifest(s, lambda m: _set(m, "offset", 0, 10**9)),
        r"column=offset row=0 check=within_array",
    ),
    "samples_share_rows_across_splits": (
        "teacher",
        lambda t: _edit_manifest(t, lambda m: _set(m, "offset", 1, m.at[0, "offset"])),
        r"column=offset row=\d+,\d+ check=disjoint_rows",
    ),
    "missing_column": (
        "teacher",
        lambda t: _edit_manifest(t, lambda m: m.drop(columns=["split"])),
        r"column=split row=- check=column_in_dataframe",
    ),
    "class_in_one_modality_only": (
        "student",
        lambda s: _drop_class(s, "9"),
        r"check=same_class_list: classes missing here: \['9'\]",
    ),
    "empty_class_in_a_split": (
        "student",
        lambda s: _edit_manifest(s, lambda m: m[~((m.label == "3") & (m.split == "val"))]),
        r"column=label row=- check=class_in_val: class '3' has no val sample",
    ),
    "array_file_missing": (
        "student",
        lambda s: (s / "frames.npy").unlink(),
        r"frames.npy column=file row=0 check=loadable_npy",
    ),
    "truncated_npy": (
        "teacher",
        lambda t: (t / "images.npy").write_bytes((t / "images.npy").read_bytes()[:200]),
        r"images.npy column=file row=0 check=loadable_npy",
    ),
    "path_escapes_dataset": (
        "student",
        lambda s: _edit_manifest(s, lambda m: _set(m, "file", 0, "../teacher/images.npy")),
        r"column=file row=0 check=inside_dataset",
    ),
    "labelled_id_not_in_train": (
        "student",
        lambda s: _append_labelled(s),
        r"labelled.csv column=id row=- check=labelled_in_train",
    ),
    "empty_manifest": (
        "teacher",
        lambda t: _edit_manifest(t, lambda m: m.iloc[:0]),
        r"check=not_empty",
    ),
}


def _poison(array: np.ndarray, value: float) -> np.ndarray:
    array = array.copy()
    array[0] = value
    return array


def _drop_class(root: Path, name: str) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta["classes"] = [c for c in meta["classes"] if c != name]
    (root / "dataset.json").write_text(json.dumps(meta))
    _edit_manifest(root, lambda m: m[m.label != name])
    labelled = pd.read_csv(root / "labelled.csv", dtype=str)
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    labelled[labelled.id.isin(manifest.id)].to_csv(root / "labelled.csv", index=False)


def _append_labelled(root: Path) -> None:
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    test_id = manifest.loc[manifest.split == "test", "id"].iloc[0]
    with (root / "labelled.csv").open("a") as fh:
        fh.write(f"{test_id}\n")


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_dataset_is_refused_with_a_message_naming_the_place(case, pair_root, tmp_path):
    teacher, student = _copy(pair_root, tmp_path)
    layout = Layout(tmp_path / "project")
    layout.validation_report.parent.mkdir(parents=True)
    layout.validation_report.write_text('{"previous": "good report"}')
    side, mutate, expected = BAD_CASES[case]
    mutate(teacher if side == "teacher" else student)
    with pytest.raises(DataContractError) as caught:
        validate_pair.fn(layout)
    message = str(caught.value)
    assert f"file={teacher if side == 'teacher' else student}" in message
    assert re.search(expected, message), message
    assert layout.validation_report.read_text() == '{"previous": "good report"}'
    assert sorted(p.name for p in layout.validation_report.parent.iterdir()) == ["report.json"]


def test_every_problem_is_reported_not_only_the_first(pair_root, tmp_path):
    _, student = _copy(pair_root, tmp_path)
    _edit_manifest(student, lambda m: _set(_set(m, "label", 1, "x"), "split", 4, "dev"))
    with pytest.raises(DataContractError) as caught:
        check_dataset(student)
    rows = {(p.column, p.row) for p in caught.value.problems}
    assert {("label", "1"), ("split", "4")} <= rows

"""Bad inputs are refused (or warned about) with a message that names the file, column, row or
class and says what was expected: float-written labels, per-id ``.npz`` files, missing splits,
truncated ``.npy`` files, lengths that do not sum to the frames, ids shared by the teacher and
the student, and unknown names in ``params.yaml``."""

from __future__ import annotations

import logging
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmkd_app.cli import main
from cmkd_core.config import (
    DistillParams,
    OTParams,
    ParamsError,
    TeacherParams,
    load_params,
    method_names,
)
from cmkd_core.data import DataContractError, check_dataset, check_pair, write_dataset
from cmkd_core.data.contract import DatasetMeta
from cmkd_core.data.importers import import_arrays, import_images

RNG = np.random.default_rng(7)


def _table(tmp_path: Path, x: np.ndarray, **columns) -> tuple[Path, Path]:
    np.save(tmp_path / "x.npy", x)
    pd.DataFrame(columns).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "x.npy", tmp_path / "labels.csv"


def _import(arrays: Path, labels: Path, out: Path) -> Path:
    return import_arrays(arrays, labels, out, name="t", modality="vector")


def _refusal(arrays: Path, labels: Path, out: Path) -> str:
    with pytest.raises(DataContractError) as caught:
        _import(arrays, labels, out)
    assert not out.exists()
    return str(caught.value)


# 1. Labels written as floats ------------------------------------------------------------------


def test_integer_labels_written_as_floats_are_refused_with_the_classes_and_a_hint(tmp_path, capsys):
    y = np.arange(60) % 10
    arrays, labels = _table(tmp_path, RNG.normal(size=(60, 3)).astype(np.float32), label=y * 1.0)
    assert (tmp_path / "labels.csv").read_text().splitlines()[1] == "0.0"  # as pandas writes it
    argv = ["import", "arrays", str(arrays), str(labels), str(tmp_path / "out")]
    assert main([*argv, "--name", "t", "--modality", "v"]) == 2
    err = capsys.readouterr().err
    assert "labels.csv column=label row=0 check=integer_labels" in err
    assert "every class is a whole number written as a float" in err
    assert "'0.0', '1.0', '2.0', '3.0', '4.0', ... (10 in all)" in err
    assert "unlike a teacher's '3'" in err and "df['label'].astype(int)" in err
    assert not (tmp_path / "out").exists()


def test_one_integer_written_both_ways_is_refused(tmp_path):
    labels = ["a", "b", "3", "3.0"] * 15
    arrays, table = _table(tmp_path, RNG.normal(size=(60, 3)).astype(np.float32), label=labels)
    text = _refusal(arrays, table, tmp_path / "out")
    assert "labels.csv column=label row=3 check=integer_labels" in text
    assert "both '3.0' and '3' are labels" in text


def test_decimal_class_names_that_are_not_all_integers_are_kept(tmp_path):
    labels = ["0.5", "1.0", "1.5"] * 20  # ratings: one whole number among them is no mistake
    arrays, table = _table(tmp_path, RNG.normal(size=(60, 3)).astype(np.float32), label=labels)
    assert check_dataset(_import(arrays, table, tmp_path / "out")).meta.classes == (
        "0.5",
        "1.0",
        "1.5",
    )


def _dataset(root: Path, classes: list[str], ids: list[str] | None = None, pairs=None) -> Path:
    """A valid fixed-size dataset: three samples per class, one in each split."""
    labels = [c for c in classes for _ in range(3)]
    n = len(labels)
    manifest = pd.DataFrame(
        {
            "id": ids or [f"{root.name}-{i}" for i in range(n)],
            "label": labels,
            "split": ["train", "val", "test"] * len(classes),
            "file": "x.npy",
            "offset": np.arange(n),
            "length": 1,
        }
    )
    if pairs is not None:
        manifest["pair"] = pairs
    meta = DatasetMeta(root.name, "vector", "fixed", (3,), tuple(classes))
    x = RNG.normal(size=(n, 3)).astype(np.float32)
    return write_dataset(root, meta, manifest, {"x.npy": x})


def test_class_lists_that_differ_by_float_spelling_name_the_likely_cause(tmp_path):
    teacher = _dataset(tmp_path / "teacher", ["0", "1", "2", "3"])
    student = _dataset(tmp_path / "student", ["0.0", "1.0", "2.0", "3.0"])
    with pytest.raises(DataContractError) as caught:
        check_pair(teacher, student)
    (problem,) = caught.value.problems
    assert problem.file.endswith("student/dataset.json") and problem.check == "same_class_list"
    assert "classes missing here: ['0', '1', '2', '3']" in problem.detail
    assert "4 of them differ only in spelling ('0.0' here is '0' there" in problem.detail
    assert "and 1 more): likely integers written as floats" in problem.detail
    assert "surrounding whitespace" not in problem.detail


def test_class_lists_that_differ_by_whitespace_say_whitespace(tmp_path):
    teacher = _dataset(tmp_path / "teacher", ["1", "2", "3"])
    student = _dataset(tmp_path / "student", ["1", "2", "3 "])
    with pytest.raises(DataContractError) as caught:
        check_pair(teacher, student)
    (problem,) = caught.value.problems
    assert "classes only here: ['3 ']" in problem.detail
    assert "1 of them differ only in spelling ('3 ' here is '3' there)" in problem.detail
    assert "likely surrounding whitespace" in problem.detail
    assert "floats" not in problem.detail


def test_class_lists_that_really_differ_get_no_spelling_hint(tmp_path):
    teacher = _dataset(tmp_path / "teacher", ["cat", "dog"])
    student = _dataset(tmp_path / "student", ["cat", "cow"])
    with pytest.raises(DataContractError) as caught:
        check_pair(teacher, student)
    detail = caught.value.problems[0].detail
    assert detail == "classes missing here: ['dog']; classes only here: ['cow']"


# 2. A per-id .npz -------------------------------------------------------------------------------


def test_an_npz_of_one_member_per_sample_is_refused_briefly_with_the_layout_expected(tmp_path):
    members = {f"clip-{i:05d}": RNG.normal(size=(4, 3)).astype(np.float32) for i in range(3000)}
    np.savez(tmp_path / "x.npz", **members)
    pd.DataFrame({"label": ["a", "b"] * 1500}).to_csv(tmp_path / "labels.csv", index=False)
    text = _refusal(tmp_path / "x.npz", tmp_path / "labels.csv", tmp_path / "out")
    assert "x.npz column=x row=- check=required: no member 'x'" in text
    assert "'clip-00000', 'clip-00001', 'clip-00002', 'clip-00003', 'clip-00004', ..." in text
    assert "(3000 in all)" in text and "clip-00005" not in text
    assert "Expected x (N, *sample_shape)" in text and "plus lengths (N,)" in text
    assert len(text) < 800


# 3. Missing splits are named in the user's table ------------------------------------------------


def test_a_split_column_without_test_is_named_not_the_manifest(tmp_path):
    x = RNG.normal(size=(40, 3)).astype(np.float32)
    arrays, labels = _table(tmp_path, x, label=["a", "b"] * 20, split=["train"] * 30 + ["val"] * 10)
    text = _refusal(arrays, labels, tmp_path / "out")
    assert "labels.csv column=split row=- check=has_test" in text
    assert "no row has split 'test' (the column holds ['train', 'val'])" in text
    assert "manifest.csv" not in text


def test_a_class_too_small_for_the_drawn_splits_is_named(tmp_path):
    labels = ["a", "b"] * 19 + ["rare"] * 2
    x = RNG.normal(size=(40, 3)).astype(np.float32)
    text = _refusal(*_table(tmp_path, x, label=labels), tmp_path / "out")
    assert "labels.csv column=label row=- check=class_in_test: class 'rare' has 2 row(s)" in text
    assert "too few to draw a test sample" in text and "manifest.csv" not in text


def test_image_import_names_the_users_csv_not_its_own_copy(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((6, 6), 20 * i, np.uint8)).save(folder / f"p{i}.png")
    table = pd.DataFrame(
        {
            "file": [f"p{i}.png" for i in range(12)],
            "label": ["x", "y"] * 6,
            "split": ["train"] * 8 + ["val"] * 4,
        }
    )
    table.to_csv(tmp_path / "pictures.csv", index=False)
    from cmkd_core.frontend import ImageFrontEnd

    with pytest.raises(DataContractError) as caught:
        import_images(folder, tmp_path / "pictures.csv", tmp_path / "out", name="p",
                      front_end=ImageFrontEnd(4, 4))  # fmt: skip
    (problem,) = caught.value.problems
    assert problem.file == str(tmp_path / "pictures.csv") and problem.column == "split"
    assert "no row has split 'test'" in problem.detail


# 4. A truncated .npy ------------------------------------------------------------------------------


def test_a_truncated_npy_says_the_bytes_declared_and_present_on_import(tmp_path):
    arrays, labels = _table(tmp_path, np.zeros((40, 3), np.float32), label=["a", "b"] * 20)
    arrays.write_bytes(arrays.read_bytes()[:200])
    text = _refusal(arrays, labels, tmp_path / "out")
    assert "x.npy column=- row=- check=readable" in text
    assert "x.npy is truncated: its header declares shape (40, 3) float32, 608 bytes" in text
    assert "(128 of header and 480 of data), but the file has 200 bytes (408 missing)" in text
    assert "mmap length" not in text


def test_a_truncated_npy_in_a_dataset_says_the_bytes_declared_and_present(tmp_path):
    root = _dataset(tmp_path / "ds", ["a", "b"])
    (root / "x.npy").write_bytes((root / "x.npy").read_bytes()[:150])
    with pytest.raises(DataContractError) as caught:
        check_dataset(root)
    text = str(caught.value)
    assert "x.npy column=file row=0 check=loadable_npy" in text
    assert "declares shape (6, 3) float32, 200 bytes" in text
    assert "the file has 150 bytes (50 missing)" in text


# 5. Lengths that do not sum to the frames -------------------------------------------------------


def test_lengths_short_of_the_frames_name_the_last_row_and_the_sums(tmp_path):
    x = RNG.normal(size=(100, 2)).astype(np.float32)
    arrays, labels = _table(tmp_path, x, label=["a", "b"] * 20, length=[2] * 40)
    text = _refusal(arrays, labels, tmp_path / "out")
    assert "labels.csv column=length row=39 check=frames: lengths sum to 80 over 40 rows" in text
    assert "the array has 100 frames: the last row, 39, ends at frame 80" in text
    assert "20 frames belong to no row" in text


def test_lengths_that_are_not_frame_counts_are_named_by_row(tmp_path):
    lengths = ["2"] * 40
    lengths[3], lengths[17] = "0", "two"
    x = RNG.normal(size=(80, 2)).astype(np.float32)
    arrays, labels = _table(tmp_path, x, label=["a", "b"] * 20, length=lengths)
    text = _refusal(arrays, labels, tmp_path / "out")
    assert "labels.csv column=length row=3 check=whole_number_ge_1: '0' is not a frame" in text
    assert "labels.csv column=length row=17 check=whole_number_ge_1: 'two'" in text


# 6. Ids in both datasets ------------------------------------------------------------------------


def test_ids_shared_by_teacher_and_student_are_a_warning_of_the_pair_check(tmp_path, caplog):
    ids = [f"t-{i:06d}" for i in range(9)]  # two imports with one --name get these
    teacher = _dataset(tmp_path / "teacher", ["a", "b", "c"], ids=ids)
    student = _dataset(tmp_path / "student", ["a", "b", "c"], ids=ids)
    with caplog.at_level(logging.WARNING, logger="cmkd_core.data.validate"):
        pair = check_pair(teacher, student)
    first, second = pair  # still unpacks as (teacher, student)
    assert first.root == teacher and second.root == student
    (warning,) = pair.warnings
    assert warning.startswith(
        f"9 id(s) are in both {teacher / 'manifest.csv'} and {student / 'manifest.csv'}"
    )
    assert "('t-000000', 't-000001', 't-000002', 't-000003', 't-000004' and 4 more)" in warning
    assert "unrelated samples" in warning and "'pair' column" in warning
    assert warning in caplog.text


def test_ids_shared_as_declared_pairs_or_not_shared_give_no_warning(tmp_path):
    ids = [f"clip{i}" for i in range(6)]
    teacher = _dataset(tmp_path / "teacher", ["a", "b"], ids=ids)
    paired = _dataset(tmp_path / "paired", ["a", "b"], ids=ids, pairs=ids)  # as import-layout
    other = _dataset(tmp_path / "other", ["a", "b"])
    assert check_pair(teacher, paired).warnings == ()
    assert check_pair(teacher, other).warnings == ()


# 7. Names in params.yaml ------------------------------------------------------------------------


NAME_CASES = {
    "distill.method": (
        "distill:\n  method: sinkorn_ssl\n",
        "unknown method 'sinkorn_ssl' (did you mean 'sinkhorn_ssl'?); valid: auto, ce, fa",
    ),
    "distill.model": (
        "distill:\n  model: sequence_cn\n",
        "unknown model 'sequence_cn' (did you mean 'sequence_cnn'?); valid: image_cnn, mlp, "
        "sequence_cnn",
    ),
    "teacher.model": ("teacher:\n  model: resnet50\n", "unknown model 'resnet50'; valid: image"),
    "teacher.source": ("teacher:\n  source: onxx\n", "'embeddings' or 'text', not 'onxx'"),
    "distill.ot.cost": ("distill:\n  ot:\n    cost: hamming\n", "'l1' or 'chordal', not 'hamming'"),
    "distill.ot.solver": ("distill:\n  ot:\n    solver: scipy\n", "'torch' or 'pot', not 'scipy'"),
    "distill.robustness": ("distill:\n  robustness: harsh\n", "'label_imbalance', not 'harsh'"),
    "distill.augment": ("distill:\n  augment: wek\n", "'weak' or 'strong', not 'wek'"),
    "distill": (
        "distill:\n  method: hinton_kd\n",
        "method 'hinton_kd' needs instance pairs: set distill.pairing: paired",
    ),
}


@pytest.mark.parametrize("key", sorted(NAME_CASES))
def test_unknown_names_are_refused_when_params_load_in_one_line(tmp_path, key):
    text, expected = NAME_CASES[key]
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError) as caught:
        load_params(tmp_path / "params.yaml")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'params.yaml'}: invalid parameters: {key}: ")
    assert expected in message and "\n" not in message and "Value error" not in message


def test_every_method_variant_and_auto_is_accepted(tmp_path):
    names = method_names()
    assert {"auto", "ce", "joint", "sinkhorn_ssl", "joint_w0.1", "sinkhorn_ssl_sem"} <= set(names)
    for name in names:
        paired = "paired" if name in ("hinton_kd", "fitnet", "c2kd") else "unpaired"
        (tmp_path / "params.yaml").write_text(f"distill:\n  method: {name}\n  pairing: {paired}\n")
        assert load_params(tmp_path / "params.yaml").distill.method == name


def test_the_literal_name_lists_match_the_registries():
    from cmkd_core.align.feature import COSTS, Solver
    from cmkd_core.data.augment import LEVELS
    from cmkd_core.data.presets import PRESETS

    def choices(model, field: str) -> tuple:
        return typing.get_args(model.model_fields[field].annotation)

    assert choices(OTParams, "cost") == COSTS
    assert choices(OTParams, "solver") == typing.get_args(Solver)
    assert choices(DistillParams, "robustness") == tuple(PRESETS)
    assert choices(DistillParams, "augment") == ("none", *LEVELS)
    assert "train" in choices(TeacherParams, "source")


def test_a_stage_refuses_an_unknown_method_with_exit_2_before_any_work(
    tmp_path, capsys, monkeypatch
):
    import json

    from flows import stages

    (tmp_path / "params.yaml").write_text("distill:\n  method: sinkorn_ssl\n")
    monkeypatch.setitem(stages.STAGES, "teacher", stages.teacher.fn)  # the flow's body, no server
    assert stages.run_stage("teacher", tmp_path, traceback=False) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmkd: ") and err.count("\n") == 1
    assert "invalid parameters: distill.method: unknown method 'sinkorn_ssl'" in err
    error = json.loads((tmp_path / ".cmkd" / "last-error.json").read_text())
    assert error["exit"] == 2 and error["stage"] == "teacher"
    assert not (tmp_path / "data").exists()  # nothing trained, nothing written


def test_the_pipeline_refuses_an_unknown_method_before_it_pulls_or_runs_a_stage(tmp_path):
    from cmkd_core.config import ParamsError
    from flows.pipeline import pipeline

    (tmp_path / "params.yaml").write_text("distill:\n  method: joint_w0.01\n")
    with pytest.raises(ParamsError, match=r"unknown method 'joint_w0\.01'.*valid: auto, ce, fa"):
        pipeline.fn(str(tmp_path))  # the flow's body: no server, no DVC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing touched

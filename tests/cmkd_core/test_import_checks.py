"""Issue 14, import path: the class order, dtypes, whitespace in labels, every non-finite row,
and an embeddings teacher that needs only its embeddings, labels and splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from cmkd_app.cli import main
from cmkd_core.bank import BankError, load_bank
from cmkd_core.config import TeacherParams
from cmkd_core.data import DataContractError, check_dataset
from cmkd_core.data.contract import class_order, read_dataset
from cmkd_core.data.defaults import DIGIT_CLASSES, image_dataset
from cmkd_core.data.importers import import_arrays
from cmkd_core.teachers import bank_from_embeddings

RNG = np.random.default_rng(14)


def test_class_order_is_the_natural_order_of_the_names():
    assert class_order(["10", "2", "1", "9", "0"]) == ("0", "1", "2", "9", "10")
    assert class_order(["Dress", "Coat", "Bag"]) == ("Bag", "Coat", "Dress")
    assert class_order(["coat", "Bag", "dress", "bag", "Coat"]) == (
        "Bag",
        "bag",
        "Coat",
        "coat",
        "dress",
    )
    assert class_order(["c10", "c9", "c1", "c09"]) == ("c1", "c09", "c9", "c10")
    assert class_order(["b", "10", "a2", "a10", "2"]) == ("2", "10", "a2", "a10", "b")
    assert class_order(["low", "mid", "high", "low"]) == ("high", "low", "mid")
    # The embedded default digits keep their order, and so do its images.
    assert class_order(reversed(DIGIT_CLASSES)) == DIGIT_CLASSES == tuple(map(str, range(10)))
    assert image_dataset(0.2, 0.2, 0)[0].classes == DIGIT_CLASSES


def _import(tmp_path: Path, x: np.ndarray, labels: list[str], out: str = "out", **table):
    np.save(tmp_path / "x.npy", x)
    pd.DataFrame({"label": labels, **table}).to_csv(tmp_path / "labels.csv", index=False)
    return import_arrays(tmp_path / "x.npy", tmp_path / "labels.csv", tmp_path / out,
                         name="t", modality="vector")  # fmt: skip


def test_imported_classes_follow_the_natural_order(tmp_path):
    names = ["item10", "dress", "item2", "Bag", "coat", "Apron"]  # (length, name): Bag coat ...
    out = _import(tmp_path, RNG.normal(size=(60, 3)).astype(np.float32), names * 10)
    assert read_dataset(out).meta.classes == ("Apron", "Bag", "coat", "dress", "item2", "item10")
    assert check_dataset(out).labels(read_dataset(out).manifest)[:6].tolist() == [5, 3, 4, 1, 2, 0]


@pytest.mark.parametrize("dtype", ["float64", "float16", "int64", "int32", "uint8"])
def test_arrays_that_are_not_float32_are_refused_never_cast(tmp_path, capsys, dtype):
    x = RNG.integers(0, 5, size=(40, 3)).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    pd.DataFrame({"label": ["a", "b"] * 20}).to_csv(tmp_path / "labels.csv", index=False)
    argv = ["import", "arrays", str(tmp_path / "x.npy"), str(tmp_path / "labels.csv")]
    assert main([*argv, str(tmp_path / "out"), "--name", "t", "--modality", "v"]) == 2
    err = capsys.readouterr().err
    assert f"x.npy column=- row=- check=dtype: found {dtype}, expected float32" in err
    assert "arr.astype(np.float32)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "x.npy"]


def test_float64_in_an_npz_is_refused_too(tmp_path):
    np.savez(tmp_path / "x.npz", x=RNG.normal(size=(40, 3)))
    pd.DataFrame({"label": ["a", "b"] * 20}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataContractError, match=r"x.npz column=x row=- .*found float64"):
        import_arrays(tmp_path / "x.npz", tmp_path / "labels.csv", tmp_path / "o", name="t",
                      modality="v")  # fmt: skip


def test_labels_with_surrounding_whitespace_are_refused_by_row(tmp_path, capsys):
    np.save(tmp_path / "x.npy", RNG.normal(size=(40, 3)).astype(np.float32))
    labels = [str(i % 4) for i in range(40)]
    labels[7], labels[30] = "3 ", " 2"
    pd.DataFrame({"label": labels}).to_csv(tmp_path / "labels.csv", index=False)
    argv = ["import", "arrays", str(tmp_path / "x.npy"), str(tmp_path / "labels.csv")]
    assert main([*argv, str(tmp_path / "out"), "--name", "t", "--modality", "v"]) == 2
    err = capsys.readouterr().err
    assert "labels.csv column=label row=7 check=no_surrounding_whitespace: '3 '" in err
    assert "labels.csv column=label row=30 check=no_surrounding_whitespace: ' 2'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "x.npy"]


def test_numeric_labels_are_kept_as_written(tmp_path):
    out = _import(tmp_path, RNG.normal(size=(40, 3)).astype(np.float32), ["03", "3"] * 20)
    assert read_dataset(out).meta.classes == ("03", "3")


def test_every_non_finite_row_is_named(tmp_path):
    x = RNG.normal(size=(60, 3)).astype(np.float32)
    x[17, 1], x[40, 0] = np.nan, np.inf
    with pytest.raises(DataContractError) as info:
        _import(tmp_path, x, ["a", "b", "c"] * 20)
    text = str(info.value)
    assert "x.npy column=- row=17 check=finite" in text
    assert "x.npy column=- row=40 check=finite" in text
    assert "2 samples with them in all" in text
    assert not (tmp_path / "out").exists()


def test_non_finite_rows_past_the_cap_are_counted(tmp_path):
    x = RNG.normal(size=(90, 3)).astype(np.float32)
    x[5:80:3] = np.nan  # 25 rows
    np.save(tmp_path / "x.npy", x)
    pd.DataFrame({"label": ["a", "b", "c"] * 30}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataContractError) as info:
        import_arrays(tmp_path / "x.npy", tmp_path / "labels.csv", tmp_path / "out", name="t",
                      modality="v", chunk=7)  # fmt: skip
    rows = [p.row for p in info.value.problems]
    assert rows == [str(r) for r in range(5, 63, 3)] + ["-"]
    assert "and 5 more samples" in info.value.problems[-1].detail
    assert "25 samples with them in all" in info.value.problems[0].detail


def test_non_finite_frames_are_reported_once_per_sequence(tmp_path):
    lengths = np.full(30, 4)
    frames = RNG.normal(size=(120, 2)).astype(np.float32)
    frames[[9, 10, 11, 100]] = np.nan  # sample 2 (three frames) and sample 25
    with pytest.raises(DataContractError) as info:
        _import(tmp_path, frames, ["a", "b", "c"] * 10, length=lengths)
    assert [p.row for p in info.value.problems] == ["2 (frame 9)", "25 (frame 100)"]


def _embeddings(n_per_class: int, classes: list[str], dim: int = 6):
    """Embeddings ``(N, dim)`` around one centre per class, their labels, and a head whose row
    ``i`` scores the ``i``-th class in natural order."""
    centres = {c: RNG.normal(scale=3, size=dim) for c in classes}
    labels = [c for _ in range(n_per_class) for c in classes]
    x = np.stack([centres[c] + RNG.normal(scale=0.3, size=dim) for c in labels])
    ordered = class_order(classes)
    head = {
        "weight": torch.tensor(np.stack([centres[c] for c in ordered]), dtype=torch.float32),
        "bias": torch.tensor([-0.5 * centres[c] @ centres[c] for c in ordered]).float(),
    }
    return x.astype(np.float32), labels, head


def test_an_embeddings_teacher_needs_only_its_embeddings_labels_and_splits(tmp_path):
    from prefect.logging import disable_run_logger

    from tasks.layout import Layout
    from tasks.train import train_teacher

    root = tmp_path / "project"
    x, labels, head = _embeddings(30, ["item10", "dress", "item2", "Bag", "coat", "Apron"])
    (root / "data" / "import").mkdir(parents=True)
    np.save(tmp_path / "emb.npy", x)
    pd.DataFrame({"label": labels}).to_csv(tmp_path / "emb.csv", index=False)
    argv = ["import", "arrays", str(tmp_path / "emb.npy"), str(tmp_path / "emb.csv")]
    assert main([*argv, str(root / "data/import/teacher"), "--name", "e", "--modality", "emb"]) == 0
    save_file(head, str(root / "data/import/teacher_head.safetensors"))
    layout = Layout(root)
    shutil.copytree(root / "data/import/teacher", layout.teacher_data)  # what prepare does
    params = TeacherParams(
        source="embeddings",
        embeddings="data/import/teacher",
        head="data/import/teacher_head.safetensors",
        model="sequence_cnn",  # unused by an embeddings teacher
    )
    assert not (root / "data/import/teacher_embeddings.npy").exists()
    with disable_run_logger():
        metrics = train_teacher.fn(layout, params)
    bank = load_bank(layout.bank)
    assert bank.classes == ("Apron", "Bag", "coat", "dress", "item2", "item10")
    assert metrics["val_accuracy"] > 0.95 and metrics["source"] == "embeddings"
    order = read_dataset(layout.teacher_data).manifest["offset"].to_numpy()
    np.testing.assert_array_equal(bank.features.numpy(), x[order])
    assert json.loads(layout.teacher_metrics.read_text())["sha256"] == metrics["sha256"]

    # A folder that is not the teacher dataset is refused, naming it.
    _import(tmp_path, x, labels, out="other")  # same samples, other ids
    with disable_run_logger(), pytest.raises(BankError, match=r"other: teacher.embeddings names"):
        train_teacher.fn(layout, params.model_copy(update={"embeddings": str(tmp_path / "other")}))


def test_embeddings_from_a_dataset_need_vector_samples(tmp_path):
    x = RNG.normal(size=(30, 2, 3)).astype(np.float32)
    ds = check_dataset(_import(tmp_path, x, ["a", "b", "c"] * 10))
    save_file({"weight": torch.zeros(3, 6), "bias": torch.zeros(3)}, str(tmp_path / "h.st"))
    with pytest.raises(BankError, match=r"shape \(2, 3\); to be the embeddings"):
        bank_from_embeddings(None, tmp_path / "h.st", ds)

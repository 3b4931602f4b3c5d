"""Classes the student has no label for: declared, accepted by the contract, never read by
training or selection, measured by seen / unseen accuracy and their harmonic mean."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cmkd_core.align.outlook import DOUBT, input_outlook, input_vectors, verdict
from cmkd_core.bank import TeacherBank
from cmkd_core.config import DataParams
from cmkd_core.data import DataContractError, check_dataset, check_pair, write_dataset
from cmkd_core.data.contract import ModalityDataset
from cmkd_core.data.tensors import Samples
from cmkd_core.data.unseen import unlabelled_class_names, withhold
from cmkd_core.distill import extract_bank
from cmkd_core.distill.auto import choose
from cmkd_core.metrics import seen_unseen
from cmkd_core.recipes import fit_student, fit_teacher, unlabelled_outlook

CPU = torch.device("cpu")
DIGITS = tuple(str(i) for i in range(10))


def test_the_classes_are_named_or_drawn_per_seed_and_one_keeps_its_labels():
    assert unlabelled_class_names(DIGITS, ["7", "3"], 0) == ("3", "7")
    drawn = {unlabelled_class_names(DIGITS, 3, seed) for seed in range(5)}
    assert all(len(d) == 3 and set(d) <= set(DIGITS) for d in drawn) and len(drawn) > 1
    assert unlabelled_class_names(DIGITS, 3, 2) == unlabelled_class_names(DIGITS, 3, 2)
    with pytest.raises(ValueError, match="'eleven' is not a class"):
        unlabelled_class_names(DIGITS, ["eleven"], 0)
    with pytest.raises(ValueError, match="at least one class must keep its labels"):
        unlabelled_class_names(DIGITS, 10, 0)
    assert DataParams(unlabelled_classes=[3, 7]).unlabelled_classes == ["3", "7"]


def _student(pair_root) -> ModalityDataset:
    return check_dataset(pair_root / "data" / "prepared" / "student")


def test_the_contract_accepts_declared_classes_without_labels_and_no_others(pair_root, tmp_path):
    student = _student(pair_root)
    labelled = sorted(student.labelled_ids)
    meta, kept = withhold(student.meta, student.manifest, labelled, ["3", "7"], 0)
    assert meta.extra["unlabelled_classes"] == ["3", "7"]
    labels = dict(zip(student.manifest["id"], student.manifest["label"], strict=True))
    assert {labels[i] for i in kept} == set(DIGITS) - {"3", "7"} and len(kept) == 80
    arrays = {name: np.asarray(a) for name, a in student.arrays.items()}
    write_dataset(tmp_path / "ok", meta, student.manifest, arrays, kept)
    assert check_dataset(tmp_path / "ok").unlabelled_classes == ("3", "7")
    write_dataset(tmp_path / "undeclared", student.meta, student.manifest, arrays, kept)
    with pytest.raises(DataContractError, match="no labelled sample of '3'"):
        check_dataset(tmp_path / "undeclared")
    write_dataset(tmp_path / "labelled", meta, student.manifest, arrays, labelled)
    with pytest.raises(DataContractError, match="10 labelled samples of '3', declared unlabelled"):
        check_dataset(tmp_path / "labelled")


def test_seen_unseen_accuracy_and_their_harmonic_mean():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 0, 2, 1])
    found = seen_unseen(y_true, y_pred, [2])
    assert found["accuracy_labelled_classes"] == pytest.approx(0.75)
    assert found["accuracy_unlabelled_classes"] == pytest.approx(0.5)
    assert found["h"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert seen_unseen(y_true, np.zeros(6, dtype=int), [2])["h"] == 0.0


def test_auto_ships_only_a_candidate_able_to_name_every_class():
    scores = {"ce": 0.9, "joint": 0.5, "sinkhorn_ssl": 0.7}
    assert choose(scores) == "ce"
    assert choose(scores, {"ce": 7, "joint": 10, "sinkhorn_ssl": 10}) == "sinkhorn_ssl"
    assert choose(scores, {"ce": 7, "joint": 10, "sinkhorn_ssl": 9}) == "joint"
    assert choose(scores, dict.fromkeys(scores, 0)) == "ce"  # every class labelled: as before
    with pytest.raises(ValueError, match="no classes_predicted for sinkhorn_ssl"):
        choose(scores, {"ce": 7, "joint": 10})


def _garbled(dataset: ModalityDataset, hidden: tuple[str, ...]) -> ModalityDataset:
    """``dataset`` with the label of every sample of a ``hidden`` class (train, val and test)
    replaced by a random one of the hidden classes."""
    manifest = dataset.manifest.copy()
    mask = manifest["label"].isin(hidden).to_numpy()
    rng = np.random.default_rng(5)
    manifest.loc[mask, "label"] = rng.choice(list(hidden), int(mask.sum()))
    assert (manifest["label"] != dataset.manifest["label"]).sum() > 100  # garbage indeed
    return replace(dataset, manifest=manifest)


@pytest.fixture(scope="module")
def hidden_pair(pair_root, tiny_params):
    teacher_ds, student = check_pair(
        pair_root / "data" / "prepared" / "teacher", pair_root / "data" / "prepared" / "student"
    )
    fitted, _ = fit_teacher(teacher_ds, tiny_params.teacher, CPU, progress=False)
    bank = extract_bank(fitted.model, teacher_ds, {})
    hidden = ("2", "5", "8")
    meta, kept = withhold(student.meta, student.manifest, sorted(student.labelled_ids), hidden, 0)
    return replace(student, meta=meta, labelled_ids=frozenset(kept)), bank, hidden


@pytest.mark.parametrize(
    ("method", "val_subset"), [("sinkhorn_ssl", 2000), ("ce", 2000), ("sinkhorn_ssl", 40)]
)
def test_no_label_of_an_unlabelled_class_is_read_by_training_or_selection(
    hidden_pair, tiny_params, method, val_subset
):
    student, bank, hidden = hidden_pair
    params = tiny_params.distill.model_copy(update={"val_subset": val_subset})
    first, _ = fit_student(student, bank, params, method, CPU, progress=False)
    again, _ = fit_student(_garbled(student, hidden), bank, params, method, CPU, progress=False)
    assert first.result.history == again.result.history
    assert first.result.best_epoch == again.result.best_epoch
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    record = first.result.history[first.result.best_epoch - 1]
    assert record["val_score"] == record["val_accuracy"] - record["val_prior_tv"]
    if method == "ce":  # without the teacher nothing names a class it has no label for
        assert record["val_pool_classes"] <= len(DIGITS) - len(hidden)


def test_the_check_before_training_reads_no_label_of_an_unlabelled_class(hidden_pair):
    student, bank, hidden = hidden_pair
    found = unlabelled_outlook(student, bank)
    assert found == unlabelled_outlook(_garbled(student, hidden), bank)
    assert found["classes"] == len(DIGITS) - len(hidden)
    assert "3 classes without labels (2, 5, 8)" in found["line"]
    # the embedded spoken digits against the handwritten digits: no shared class geometry
    assert found["correlation"] < DOUBT and found["verdict"].startswith("do not expect")
    assert unlabelled_outlook(replace(student, meta=replace(student.meta, extra={})), bank) is None


def _bank_of(features: torch.Tensor, labels: torch.Tensor) -> TeacherBank:
    classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    return TeacherBank(
        features=features,
        labels=labels,
        splits=torch.zeros(len(labels), dtype=torch.long),
        head_weight=torch.zeros(len(classes), features.shape[1]),
        head_bias=torch.zeros(len(classes)),
        classes=classes,
        info={},
        ids=tuple(str(i) for i in range(len(labels))),
    )


def test_the_check_before_training_tells_shared_from_unrelated_class_geometry():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat(20)
    centres = torch.randn(8, 16, generator=gen) + torch.randn(16, generator=gen)
    bank = _bank_of(centres[labels] + 0.3 * torch.randn(160, 16, generator=gen), labels)
    # clips of 5 frames, 2 of them padding with a huge value: only valid frames count
    frames = centres[labels][:, None, :].repeat(1, 5, 1) + 0.3 * torch.randn(160, 5, 16)
    frames[:, 3:] = 1e6
    same = Samples.from_padded(frames, torch.full((160,), 3), labels)
    assert torch.allclose(input_vectors(same)[0], frames[0, :3].double().mean(0))
    shared = input_outlook(bank, [same], hidden=[6, 7])
    assert shared["classes"] == 6 and shared["correlation"] > 0.9
    assert shared["verdict"] == verdict(1.0) and verdict(1.0).startswith("expect")
    other = torch.randn(8, 16, generator=gen)[labels] + 0.3 * torch.randn(160, 16, generator=gen)
    unrelated = input_outlook(bank, [Samples((other,), labels)], hidden=[6, 7])
    assert unrelated["correlation"] < shared["correlation"] - 0.3

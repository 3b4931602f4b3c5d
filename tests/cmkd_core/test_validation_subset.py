"""distill.val_subset: each round is scored on a fixed stratified part of a large validation
split, the chosen round's student on all of it; splits no larger are untouched."""

from __future__ import annotations

import pytest
import torch

from cmkd_core.data import check_pair
from cmkd_core.data.samplers import stratified_subset
from cmkd_core.distill import accuracy_of, extract_bank
from cmkd_core.recipes import fit_student, fit_teacher

CPU = torch.device("cpu")


def test_a_stratified_subset_keeps_each_class_share_and_is_fixed_by_its_seed():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    index = stratified_subset(labels, 100, seed=3)
    assert torch.equal(index, stratified_subset(labels, 100, seed=3))
    assert not torch.equal(index, stratified_subset(labels, 100, seed=4))
    assert torch.bincount(labels[index]).tolist() == [60, 30, 10]
    assert torch.equal(index, torch.sort(index).values) and len(set(index.tolist())) == 100
    assert torch.equal(stratified_subset(labels, 5000, seed=0), torch.arange(1000))


@pytest.fixture(scope="module")
def pair(pair_root, tiny_params):
    teacher_ds, student = check_pair(
        pair_root / "data" / "prepared" / "teacher", pair_root / "data" / "prepared" / "student"
    )
    fitted, _ = fit_teacher(teacher_ds, tiny_params.teacher, CPU, progress=False)
    return student, extract_bank(fitted.model, teacher_ds, {})


def test_rounds_see_the_subset_and_the_chosen_round_is_scored_on_the_whole_split(pair, tiny_params):
    student, bank = pair
    params = tiny_params.distill.model_copy(update={"val_subset": 50})
    fitted, split = fit_student(student, bank, params, "ce", CPU, progress=False)
    result = fitted.result
    assert len(split["val"]) == 500 and result.full_validation is not None
    assert result.best_val_accuracy == accuracy_of(fitted.model, split["val"])
    assert result.best_val_accuracy == result.full_validation["val_accuracy"]
    # a round's accuracy is a share of 50 samples, not of 500
    assert all(round(r["val_accuracy"] * 50, 6) % 1 == 0 for r in result.history)


def test_a_split_no_larger_than_the_subset_is_validated_as_before(pair, tiny_params):
    student, bank = pair
    default = tiny_params.distill  # val_subset 2000 > 500 val clips
    whole = default.model_copy(update={"val_subset": None})
    a, _ = fit_student(student, bank, default, "ce", CPU, progress=False)
    b, _ = fit_student(student, bank, whole, "ce", CPU, progress=False)
    assert a.result.history == b.result.history and a.result.full_validation is None
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key

"""The CUDA path (``device: auto`` on a machine with a GPU). Skipped without one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmkd_core.data import check_pair
from cmkd_core.distill import accuracy_of, extract_bank, resolve_device
from cmkd_core.export import check_parity, export_onnx
from cmkd_core.recipes import fit_student, fit_teacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def on_cuda(pair_root, tiny_params):
    prepared = pair_root / "data" / "prepared"
    teacher_ds, student_ds = check_pair(prepared / "teacher", prepared / "student")
    fitted, data = fit_teacher(teacher_ds, tiny_params.teacher, CUDA, progress=False)
    bank = extract_bank(fitted.model, teacher_ds, {}, device=CUDA)
    return {"teacher": fitted, "teacher_data": data, "bank": bank, "ds": student_ds}


def test_auto_resolves_to_cuda():
    assert resolve_device("auto").type == "cuda"


def test_teacher_trains_on_cuda_and_its_bank_lands_on_the_host(on_cuda):
    assert next(on_cuda["teacher"].model.parameters()).is_cuda
    assert accuracy_of(on_cuda["teacher"].model, on_cuda["teacher_data"]["test"]) > 0.5
    bank = on_cuda["bank"]
    assert bank.features.device.type == "cpu" and torch.isfinite(bank.features).all()
    assert bank.features.shape == (1797, 32)


@pytest.mark.parametrize("method", ["ce", "fa", "la", "joint", "bilevel", "prototype_kd", "mmd"])
def test_every_unpaired_method_trains_on_cuda(on_cuda, tiny_params, method):
    params = tiny_params.distill.model_copy(update={"epochs": 2})
    fitted, _ = fit_student(on_cuda["ds"], on_cuda["bank"], params, method, CUDA, progress=False)
    assert next(fitted.model.parameters()).is_cuda
    assert all(np.isfinite(r["loss"]) for r in fitted.result.history)


def test_a_cuda_trained_student_exports_and_matches_onnx(on_cuda, tiny_params, tmp_path):
    fitted, split = fit_student(
        on_cuda["ds"], on_cuda["bank"], tiny_params.distill, "joint", CUDA, progress=False
    )
    path = export_onnx(fitted.model, split["test"], tmp_path / "student.onnx")
    parity = check_parity(fitted.model.cpu(), path, split["test"].to("cpu"), atol=1e-4)
    assert parity.same_predictions and parity.n == 500

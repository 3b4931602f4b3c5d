"""A teacher given as an ONNX file: its bank, its recovered head, and the ways it is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from cmkd_core.bank import BankError, load_bank
from cmkd_core.data import check_dataset
from cmkd_core.distill import accuracy_of
from cmkd_core.distill.recipes import fit_teacher
from cmkd_core.teachers import bank_from_onnx


@pytest.fixture(scope="module")
def onnx_teacher(pair_root, tiny_params, tmp_path_factory, export_teacher_onnx):
    dataset = check_dataset(pair_root / "data" / "prepared" / "teacher")
    fitted, data = fit_teacher(dataset, tiny_params.teacher, torch.device("cpu"), progress=False)
    folder = tmp_path_factory.mktemp("onnx-teacher")
    example = data["test"].inputs[0][:4]
    export_teacher_onnx(fitted.model, example, folder / "teacher.onnx")
    export_teacher_onnx(fitted.model, example, folder / "squashed.onnx", squash=True)
    export_teacher_onnx(fitted.model, example, folder / "renamed.onnx", ("emb", "logits"))
    accuracy = accuracy_of(fitted.model, data["test"])
    return {"dataset": dataset, "folder": folder, "accuracy": accuracy, "model": fitted.model}


def test_onnx_teacher_gives_the_bank_and_head_of_the_torch_teacher(onnx_teacher):
    bank, accuracy = bank_from_onnx(
        onnx_teacher["folder"] / "teacher.onnx", onnx_teacher["dataset"]
    )
    assert accuracy["test"] == pytest.approx(onnx_teacher["accuracy"], abs=1e-6)
    # The recovered head gives the teacher's logits (weights of features that are zero on every
    # train sample are not identifiable, so compare what the head does, not its weights).
    with torch.no_grad():
        want = onnx_teacher["model"].head(bank.features)
    assert (bank.head()(bank.features).detach() - want).abs().max() < 1e-3
    assert bank.features.shape == (1797, 32) and bank.info["source"] == "onnx"


def test_onnx_teacher_refusals_name_the_file_and_the_output(onnx_teacher):
    folder, dataset = onnx_teacher["folder"], onnx_teacher["dataset"]
    with pytest.raises(BankError, match=r"renamed.onnx: no output named 'features'.*'emb'"):
        bank_from_onnx(folder / "renamed.onnx", dataset)
    with pytest.raises(BankError, match=r"squashed.onnx: 'logits' is not a linear function"):
        bank_from_onnx(folder / "squashed.onnx", dataset)
    (folder / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(BankError, match=r"broken.onnx: not a loadable ONNX model"):
        bank_from_onnx(folder / "broken.onnx", dataset)


def test_teacher_stage_uses_the_onnx_teacher_from_params(
    onnx_teacher, pair_root, tmp_path, prefect_harness
):
    from flows.stages import teacher

    shutil.copytree(pair_root / "data" / "prepared", tmp_path / "data" / "prepared")
    (tmp_path / "data" / "import").mkdir(parents=True)
    shutil.copy(onnx_teacher["folder"] / "teacher.onnx", tmp_path / "data" / "import")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"teacher": {"source": "onnx"}}))
    metrics = teacher(root=str(tmp_path))
    assert metrics["test_accuracy"] == pytest.approx(onnx_teacher["accuracy"], abs=1e-6)
    bank = load_bank(tmp_path / "data" / "teacher" / "bank.safetensors")
    assert bank.info["source"] == "onnx" and len(bank.info["onnx_sha256"]) == 64
    saved = json.loads((tmp_path / "data" / "teacher" / "metrics.json").read_text())
    assert saved["source"] == "onnx"

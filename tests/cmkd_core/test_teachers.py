"""A teacher given as an ONNX file: its bank, its recovered head, and the ways it is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from cmkd_app.cli import main
from cmkd_core.bank import BankError, load_bank, save_bank
from cmkd_core.data import check_dataset
from cmkd_core.distill import accuracy_of
from cmkd_core.recipes import fit_teacher
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
    assert bank.info["source"] == "onnx" and len(bank.info["sha256"]) == 64
    saved = json.loads((tmp_path / "data" / "teacher" / "metrics.json").read_text())
    assert saved["source"] == "onnx"


MODULE = """
import torch
from torch import nn


class Teacher(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.body = nn.Linear(64, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        features = torch.relu(self.body(x.flatten(1)))
        return features, self.head(features)
"""


class _Payload:
    """A pickle whose loading would create a file: it must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_torch_module_teacher_by_import_path(onnx_teacher, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from cmkd_core.teachers import bank_from_module

    (tmp_path / "my_teacher_module.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_teacher_module

    model = my_teacher_module.Teacher(dim=16)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    dataset = onnx_teacher["dataset"]
    bank, _ = bank_from_module(
        "my_teacher_module:Teacher", tmp_path / "w.safetensors", dataset, {"dim": 16}
    )
    with torch.no_grad():
        want = model.head(bank.features)
    assert (bank.head()(bank.features) - want).abs().max() < 1e-3
    assert bank.info["source"] == "torch" and bank.features.shape == (1797, 16)
    with pytest.raises(BankError, match=r"w.safetensors: do not fit my_teacher_module:Teacher"):
        bank_from_module(
            "my_teacher_module:Teacher", tmp_path / "w.safetensors", dataset, {"dim": 8}
        )
    with pytest.raises(BankError, match=r"nowhere:Teacher: cannot import the teacher class"):
        bank_from_module("nowhere:Teacher", tmp_path / "w.safetensors", dataset)
    # A malicious pickle where a checkpoint is expected: refused, and its payload never ran.
    marker = tmp_path / "payload-ran"
    torch.save({"body.weight": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(BankError, match=r"evil.pt: not loadable weights"):
        bank_from_module("my_teacher_module:Teacher", tmp_path / "evil.pt", dataset)
    assert not marker.exists()


def test_embeddings_and_head_teacher(onnx_teacher, tmp_path, capsys):
    from safetensors.torch import save_file

    from cmkd_core.teachers import bank_from_embeddings

    dataset = onnx_teacher["dataset"]
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.normal(size=(1797, 12)).astype(np.float32))
    head = {"weight": torch.randn(10, 12), "bias": torch.randn(10)}
    save_file(head, str(tmp_path / "head.safetensors"))
    bank, accuracy = bank_from_embeddings(
        tmp_path / "emb.npy", tmp_path / "head.safetensors", dataset
    )
    assert torch.equal(bank.head_weight, head["weight"]) and 0 <= accuracy["val"] <= 1
    save_bank(bank, tmp_path / "bank.safetensors")
    assert main(["bank", "inspect", str(tmp_path / "bank.safetensors"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["rows"] == 1797 and facts["feature_dim"] == 12
    assert facts["val_accuracy"] == pytest.approx(accuracy["val"], abs=1e-6)
    assert sum(facts["counts"]["val"].values()) == 359 and facts["info"]["source"] == "embeddings"
    save_file(
        {"weight": torch.randn(10, 13), "bias": torch.randn(10)}, str(tmp_path / "h2.safetensors")
    )
    with pytest.raises(
        BankError, match=r"emb.npy: head weight \(10, 13\).*do not fit 12-d features"
    ):
        bank_from_embeddings(tmp_path / "emb.npy", tmp_path / "h2.safetensors", dataset)
    save_file({"weight": torch.randn(10, 12)}, str(tmp_path / "h3.safetensors"))
    with pytest.raises(BankError, match=r"h3.safetensors: missing tensor 'bias'"):
        bank_from_embeddings(tmp_path / "emb.npy", tmp_path / "h3.safetensors", dataset)
    np.save(tmp_path / "short.npy", np.zeros((100, 12), np.float32))
    with pytest.raises(BankError, match=r"short.npy: 100 feature rows for 1797 samples"):
        bank_from_embeddings(tmp_path / "short.npy", tmp_path / "head.safetensors", dataset)

"""The teacher bank file and the typed parameters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cmkd_core.bank import BankError, TeacherBank, load_bank, save_bank
from cmkd_core.config import ParamsError, load_params


def _bank(n: int = 12, d: int = 4, c: int = 3) -> TeacherBank:
    gen = torch.Generator().manual_seed(0)
    return TeacherBank(
        features=torch.randn(n, d, generator=gen),
        labels=torch.arange(n) % c,
        splits=torch.arange(n) % 3,
        head_weight=torch.randn(c, d, generator=gen),
        head_bias=torch.zeros(c),
        classes=tuple("abc"[:c]),
        info={"val_accuracy": 0.9},
    )


def test_bank_round_trip(tmp_path):
    bank = _bank()
    save_bank(bank, tmp_path / "bank.safetensors")
    back = load_bank(tmp_path / "bank.safetensors")
    assert torch.equal(back.features, bank.features) and back.classes == ("a", "b", "c")
    assert back.info == {"val_accuracy": 0.9}
    assert int(back.split("train").sum()) == 4
    x = torch.randn(2, 4)
    assert torch.allclose(back.head()(x), x @ bank.head_weight.T + bank.head_bias)
    assert not any(p.requires_grad for p in back.head().parameters())


def test_bank_whose_head_does_not_fit_its_features_is_refused(tmp_path):
    good = _bank()
    tensors = {
        "features": good.features,
        "labels": good.labels,
        "splits": good.splits,
        "head_weight": torch.randn(3, 7),
        "head_bias": good.head_bias,
    }
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"classes": '["a","b","c"]'})
    with pytest.raises(BankError, match=r"bad.safetensors: .*'head_weight' has shape \(3, 7\)"):
        load_bank(tmp_path / "bad.safetensors")


def test_bank_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "bank.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(BankError, match="not a readable safetensors bank"):
        load_bank(tmp_path / "bank.safetensors")


def test_params_file_of_the_repo_loads():
    params = load_params("params.yaml")
    assert params.distill.method == "auto" and params.distill.ot.reg == 0.1
    assert params.distill.min_steps == 300 and params.distill.ssl.start == 50
    assert params.teacher.threads == params.distill.threads == 2


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    (tmp_path / "params.yaml").write_text("distill:\n  w_fa: 1.0\n  lerning_rate: 0.1\n")
    with pytest.raises(ParamsError, match=r"distill\.lerning_rate: Extra inputs are not permitted"):
        load_params(tmp_path / "params.yaml")


def test_bad_value_is_an_error_that_names_it(tmp_path):
    (tmp_path / "params.yaml").write_text("distill:\n  ot:\n    cost: hamming\n")
    with pytest.raises(ParamsError, match=r"distill\.ot\.cost"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("teacher.onnx", "../elsewhere/teacher.onnx"),
        ("teacher.weights", "/etc/passwd"),
        ("teacher.embeddings", "data/../../x.npy"),
        ("data.import_dir", "data/import/../../.."),
        ("data.recordings", "~/recordings.zip"),
    ],
)
def test_params_paths_outside_the_data_folder_are_refused_unless_allowed(tmp_path, key, value):
    section, name = key.split(".")
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {name}: '{value}'\n")
    with pytest.raises(ParamsError, match=rf"{key}: .* is outside the project's data/ folder"):
        load_params(path)
    path.write_text(f"allow_paths_outside_data: true\n{section}:\n  {name}: '{value}'\n")
    assert getattr(getattr(load_params(path), section), name) == value

"""Teacher and student training on the real pair (tiny budget), determinism, ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cmkd_core.data import check_pair
from cmkd_core.distill import extract_bank, predict_logits
from cmkd_core.export import ParityError, check_parity, export_onnx, onnx_logits
from cmkd_core.recipes import fit_student, fit_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(pair_root, tiny_params):
    prepared = pair_root / "data" / "prepared"
    teacher_ds, student_ds = check_pair(prepared / "teacher", prepared / "student")
    fitted, _ = fit_teacher(teacher_ds, tiny_params.teacher, CPU, progress=False)
    bank = extract_bank(fitted.model, teacher_ds, {})
    student, data = fit_student(student_ds, bank, tiny_params.distill, "joint", CPU, progress=False)
    return {"teacher": fitted, "bank": bank, "student": student, "data": data, "ds": student_ds}


def test_teacher_learns_and_bank_holds_every_sample(trained, pair_root):
    result = trained["teacher"].result
    assert result.best_val_accuracy > 0.5  # 3 epochs on real digits: far above chance (0.1)
    assert 1 <= result.best_epoch <= 3
    bank = trained["bank"]
    assert bank.features.shape == (1797, 32) and bank.head_weight.shape == (10, 32)


def test_joint_student_records_every_loss_term_and_selects_on_val(trained):
    history = trained["student"].result.history
    assert {"ce", "fa", "la", "loss", "val_accuracy"} <= set(history[0])
    assert all(np.isfinite(r["loss"]) for r in history)
    best = max(history, key=lambda r: r["val_accuracy"])
    assert trained["student"].result.best_epoch == best["epoch"]
    # The model holds the weights of the selected epoch.
    val = trained["data"]["val"]
    acc = float(
        (predict_logits(trained["student"].model, val).argmax(1) == val.labels).float().mean()
    )
    assert acc == pytest.approx(best["val_accuracy"])


def test_student_training_is_deterministic_on_cpu(trained, tiny_params):
    again, _ = fit_student(
        trained["ds"], trained["bank"], tiny_params.distill, "joint", CPU, progress=False
    )
    first = trained["student"].model.state_dict()
    for name, tensor in again.model.state_dict().items():
        assert torch.equal(tensor, first[name]), name


def test_onnx_export_matches_torch_on_the_test_split(trained, tmp_path):
    model, test = trained["student"].model, trained["data"]["test"]
    path = export_onnx(model, test, tmp_path / "student.onnx")
    onnx.checker.check_model(str(path))
    assert not list(tmp_path.glob("*.data")), "weights must live inside the one file"
    # Nothing of this checkout in the file: the same student gives the same bytes anywhere.
    here = str(Path(__file__).resolve().parents[2]).encode()
    assert b"stack_trace" not in path.read_bytes() and here not in path.read_bytes()
    parity = check_parity(model, path, test, atol=1e-4)
    assert parity.n == len(test) == 500 and parity.same_predictions
    # Dynamic axes: batch 1 of 6 frames, batch 7 of 92 frames.
    session = ort.InferenceSession(str(path))
    for n, t in ((1, 6), (7, 92)):
        x = np.random.default_rng(0).normal(size=(n, t, 13)).astype(np.float32)
        lengths = np.full(n, t, dtype=np.int64)
        out = session.run(["logits"], {"x": x, "lengths": lengths})[0]
        want = model(torch.from_numpy(x), torch.from_numpy(lengths)).detach().numpy()
        assert out.shape == (n, 10) and np.abs(out - want).max() < 1e-4


def test_parity_gate_fails_when_onnx_and_torch_disagree(trained, tmp_path):
    model, test = trained["student"].model, trained["data"]["test"]
    path = export_onnx(model, test, tmp_path / "student.onnx")
    with torch.no_grad():
        model.head.bias[0] += 1.0  # the torch model drifts from the exported file
    try:
        with pytest.raises(ParityError, match=r"student.onnx: onnxruntime differs from torch"):
            check_parity(model, path, test, atol=1e-4)
    finally:
        with torch.no_grad():
            model.head.bias[0] -= 1.0
    assert onnx_logits(ort.InferenceSession(str(path)), test).shape == (500, 10)


def test_safetensors_files_have_the_same_bytes_whichever_process_writes_them(tmp_path):
    """safetensors orders its metadata by a per-process hash seed; ours is sorted."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = (
        "import sys, torch; from cmkd_core.tensorfile import save_tensors; "
        "save_tensors({'w': torch.arange(6.).reshape(2, 3), 'b': torch.ones(2)}, sys.argv[1], "
        "{'spec': '{}', 'info': '[]', 'ids': 'x', 'classes': 'y'})"
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    assert torch.equal(load_file(paths[0])["w"], torch.arange(6.0).reshape(2, 3))

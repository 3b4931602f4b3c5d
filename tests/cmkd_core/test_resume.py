"""Per-epoch checkpoints: a run interrupted after any epoch and resumed ends bitwise equal to
one that was not; checkpoints of other settings are ignored; a pickle with code is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from cmkd_core.data import check_pair
from cmkd_core.distill import TrainSettings, train_classifier
from cmkd_core.distill.batches import BatchSource
from cmkd_core.distill.loop import Callback
from cmkd_core.distill.methods import create_method
from cmkd_core.distill.resume import CheckpointError, ResumeCheckpoint
from cmkd_core.recipes import fit_teacher, new_model, split_samples, student_spec

SETTINGS = TrainSettings(
    epochs=4, batch_size=32, lr=3e-3, weight_decay=0.05, warmup_epochs=1, seed=0, progress=False
)


class InterruptError(Exception):
    pass


class StopAfter(Callback):
    """Raise after epoch ``epoch`` (its checkpoint is written by then): a crash mid-run."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, record, model) -> None:
        if record["epoch"] == self.epoch:
            raise InterruptError


@pytest.fixture(scope="module")
def parts(pair_root, tiny_params):
    teacher_ds, student = check_pair(
        pair_root / "data" / "prepared" / "teacher", pair_root / "data" / "prepared" / "student"
    )
    fitted, _ = fit_teacher(teacher_ds, tiny_params.teacher, torch.device("cpu"), progress=False)
    from cmkd_core.distill import extract_bank

    bank = extract_bank(fitted.model, teacher_ds, {})
    return student, bank, tiny_params.distill


def _run(parts, settings: TrainSettings, stop: int | None = None):
    """Train the joint student from scratch objects (as a new process would build them)."""
    student, bank, params = parts
    data = split_samples(student, bank.classes, torch.device("cpu"), labelled_only=True)
    model = new_model(student_spec(student, bank, params), data["train"], "cpu", params.seed)
    method = create_method("joint", params, bank)
    torch.manual_seed(123)  # the global stream (dropout) as a fresh process would leave it
    batches = BatchSource(data["train"], method, settings, bank=bank)
    args = (model, method, batches, data["val"], settings)
    if stop is not None:
        with pytest.raises(InterruptError):
            train_classifier(*args, callbacks=[StopAfter(stop)])
        return None
    result = train_classifier(*args)
    return result, model.state_dict()


def test_a_run_interrupted_after_each_epoch_resumes_to_the_same_weights(parts, tmp_path):
    plain, plain_state = _run(parts, SETTINGS)
    for stop in (1, 2, 3):
        path = tmp_path / f"stop{stop}.pt"
        settings = TrainSettings(**{**SETTINGS.__dict__, "checkpoint": str(path)})
        _run(parts, settings, stop=stop)
        assert torch.load(path, weights_only=True)["epoch"] == stop
        resumed, state = _run(parts, settings)
        assert resumed.history == plain.history
        assert resumed.best_epoch == plain.best_epoch
        for name, tensor in plain_state.items():
            assert torch.equal(state[name], tensor), (stop, name)


def test_a_checkpoint_of_other_settings_is_not_resumed(parts, tmp_path):
    path = tmp_path / "run.pt"
    other = TrainSettings(**{**SETTINGS.__dict__, "checkpoint": str(path), "checkpoint_key": "a"})
    _run(parts, other, stop=2)
    mine = TrainSettings(**{**SETTINGS.__dict__, "checkpoint": str(path), "checkpoint_key": "b"})
    result, _ = _run(parts, mine)
    plain, _ = _run(parts, SETTINGS)
    assert result.history == plain.history  # trained from the start, not from key a's epoch 2


class Payload:
    """Unpickling this creates a file: proof that the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


def test_a_malicious_pickle_in_place_of_a_checkpoint_is_refused_unrun(parts, tmp_path):
    path, marker = tmp_path / "distill-joint.pt", tmp_path / "pwned"
    path.write_bytes(pickle.dumps({"format": "cmkd-resume-1", "model": Payload(marker)}))
    settings = TrainSettings(**{**SETTINGS.__dict__, "checkpoint": str(path)})
    with pytest.raises(CheckpointError, match="not a cmkd checkpoint, refused without running"):
        _run(parts, settings)
    assert not marker.exists()
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=str(path)):
        ResumeCheckpoint(path, "", **dict.fromkeys(_OBJECTS)).read()


_OBJECTS = ("model", "method", "optimizer", "scheduler", "generator", "best")

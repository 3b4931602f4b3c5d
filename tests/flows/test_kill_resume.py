"""The distill stage killed with SIGKILL at random moments, three times, then run to the end,
gives bitwise the same students, and so the same metrics and ONNX outputs, as a run that was
never interrupted; no half-written file is left under a final name."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_trained_project
from safetensors.torch import load_file

from cmkd_core.data import read_dataset
from cmkd_core.data.tensors import samples_of
from cmkd_core.export import onnx_logits
from tasks.dvc import stage_environment

BUDGET = {"epochs": 30, "batch_size": 16, "warmup_epochs": 1}


@pytest.fixture(scope="module")
def project(tmp_path_factory, pair_root, tiny_params, prefect_harness) -> Path:
    """The default pair validated and a teacher banked, as the stages before distill leave it."""
    params = tiny_params.model_dump(mode="json")
    params["distill"].update(BUDGET)
    return make_trained_project(tmp_path_factory.mktemp("killed"), pair_root, params)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _stage(root: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "stage", name, "--root", str(root)],
        cwd=Path(__file__).resolve().parents[2],
        env=stage_environment(_api_url()),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def _outputs(root: Path) -> dict:
    """Every tensor of every student, and the histories."""
    out = {}
    for path in sorted((root / "data" / "distill").iterdir()):
        if path.suffix == ".safetensors":
            out[path.name] = load_file(path)
        else:
            out[path.name] = json.loads(path.read_text())
    return out


def _evaluate_and_export(root: Path) -> tuple[dict, np.ndarray]:
    from flows.stages import evaluate, export

    evaluate(root=str(root))
    export(root=str(root))
    metrics = json.loads((root / "data" / "evaluate" / "metrics.json").read_text())
    dataset = read_dataset(root / "data" / "prepared" / "student")
    classes = json.loads((root / "data" / "export" / "model_card.json").read_text())["classes"]
    test = samples_of(dataset, dataset.rows("test"), classes)
    session = ort.InferenceSession(str(root / "data" / "export" / "student.onnx"))
    return metrics, onnx_logits(session, test)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict) and all(isinstance(v, torch.Tensor) for v in a[name].values()):
            assert a[name].keys() == b[name].keys()
            for key in a[name]:
                assert torch.equal(a[name][key], b[name][key]), (name, key)
        else:
            assert a[name] == b[name], name


def test_distill_killed_three_times_resumes_to_the_same_results(project):
    rng = random.Random(7)
    done = _stage(project, "distill")
    assert done.wait(timeout=600) == 0, done.stderr.read().decode()
    reference = _outputs(project)
    ref_metrics, ref_logits = _evaluate_and_export(project)
    checkpoints = project / ".cmkd" / "checkpoints"
    assert not list(checkpoints.glob("*.pt"))  # cleared once the stage's outputs are written
    shutil.rmtree(project / "data" / "distill")

    kills, last = [], 0
    for _ in range(3):
        process = _stage(project, "distill")
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            epochs = {p.name: _checkpoint_epoch(p) for p in checkpoints.glob("distill-*.pt")}
            progress = sum(epochs.values())
            if progress > last:  # a new epoch is saved: kill a random moment into the next
                time.sleep(rng.uniform(0.0, 0.3))
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills.append(progress)
                last = progress
                break
            time.sleep(0.05)
        assert process.returncode == -signal.SIGKILL, "the stage ended before it was killed"
        # A kill can land in a checkpoint's atomic write: its hidden temporary file stays
        # (until the next start clears it), never a half-written file under a final name.
        temps = [p for p in project.rglob(".*.tmp") if p.is_file()]
        assert [p for p in temps if p.parent != checkpoints] == []
        for saved in checkpoints.glob("distill-*.pt"):
            torch.load(saved, weights_only=True)  # whole: a torn file would not load
    assert len(kills) == 3 and kills == sorted(kills)
    (checkpoints / ".distill-ce.pt.torn.tmp").write_bytes(b"torn")  # as a kill mid-write leaves
    finish = _stage(project, "distill")
    assert finish.wait(timeout=600) == 0, finish.stderr.read().decode()
    assert [p for p in project.rglob(".*.tmp") if p.is_file()] == []  # cleared by the resume
    _same(_outputs(project), reference)
    metrics, logits = _evaluate_and_export(project)
    assert metrics == ref_metrics
    np.testing.assert_array_equal(logits, ref_logits)


def _complete(path: Path) -> bool:
    """Whether the file under a final name loads whole, by its kind."""
    import onnx

    from cmkd_core.data.contract import load_npy

    readers = {
        ".json": lambda p: json.loads(p.read_text()),
        ".safetensors": load_file,
        ".npy": lambda p: np.asarray(load_npy(p)).sum(),
        ".onnx": lambda p: onnx.checker.check_model(onnx.load(str(p))),
        ".csv": lambda p: p.read_text().splitlines()[0],
        ".png": lambda p: p.read_bytes()[-8:] == b"IEND\xaeB`\x82" or 1 / 0,
    }
    try:
        readers.get(path.suffix, lambda p: p.read_bytes())(path)
        return True
    except Exception:
        return False


@pytest.mark.parametrize(
    "stage", ["prepare", "validate", "teacher", "distill", "evaluate", "export"]
)
def test_a_stage_killed_at_a_random_moment_leaves_only_whole_files(project, stage):
    rng = random.Random(stage)
    before = {p: p.stat().st_mtime_ns for p in (project / "data").rglob("*") if p.is_file()}
    assert before, "the previous test leaves every stage's outputs"
    process = _stage(project, stage)
    time.sleep(rng.uniform(4.0, 12.0))  # start-up is about 5-8 s: some kills land mid-stage
    process.send_signal(signal.SIGKILL)
    process.wait()
    final = [p for p in (project / "data").rglob("*") if p.is_file() and p.name[0] != "."]
    assert final and all(_complete(p) for p in final), [p for p in final if not _complete(p)]
    for path in before:  # every output is there still: untouched, or replaced whole
        assert path.exists(), path

"""The README's "Your own data" steps, exactly, on files this test makes: teacher images as
arrays plus a teacher ONNX file, student speech as a folder of WAV files, then ``cmkd run`` in a
scratch git repo and ``cmkd predict`` on a WAV file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import cmkd, make_scratch_repo
from scipy.io import wavfile

from cmkd_core.data import check_dataset
from cmkd_core.recipes import fit_teacher

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("low", "mid", "high")


def _teacher_files(folder: Path) -> None:
    """Teacher modality: 8x8 images, a bar whose row says the class, 20 per class."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(60):
        c = i % 3
        image = rng.normal(scale=0.2, size=(8, 8))
        image[1 + 3 * c] += 1.0
        images.append(image)
        labels.append(CLASSES[c])
    np.save(folder / "teacher.npy", np.array(images, np.float32))
    pd.DataFrame({"label": labels}).to_csv(folder / "teacher.csv", index=False)


LONG = 7
"""The clip that lasts 100 times the longest of the others (issue 26: one long clip must pass
through every stage, not pad the whole split to its length)."""


def _student_files(folder: Path) -> None:
    """Student modality: 60 WAV clips of three pitches (16 kHz, int16), one 100x the longest."""
    clips = folder / "clips"
    clips.mkdir()
    rows = []
    for i in range(60):
        c = i % 3
        seconds = 100 * 0.55 if i == LONG else 0.25 + 0.005 * i
        t = np.arange(int(seconds * 16000)) / 16000
        noise = np.random.default_rng(i).normal(scale=0.05, size=t.shape)
        audio = 0.5 * np.sin(2 * np.pi * (300, 700, 1500)[c] * t) + noise
        wavfile.write(clips / f"clip{i:02d}.wav", 16000, (audio * 32767).astype(np.int16))
        rows.append({"file": f"clip{i:02d}.wav", "label": CLASSES[c]})
    pd.DataFrame(rows).to_csv(folder / "clips.csv", index=False)


def _cmkd(repo: Path, *args: str, api_url: str | None = None) -> subprocess.CompletedProcess:
    done = cmkd(repo, *args, api_url=api_url)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_wav_folder_and_teacher_onnx_to_an_exported_student(
    tmp_path, recordings, prefect_harness, export_teacher_onnx, tiny_params
):
    from prefect.settings import PREFECT_API_URL

    repo = make_scratch_repo(tmp_path / "repo", recordings)  # as a fresh clone would be
    mine = tmp_path / "mine"
    mine.mkdir()
    _teacher_files(mine)
    _student_files(mine)
    api = PREFECT_API_URL.value()

    # Step 1: import both modalities (README, "Your own data").
    _cmkd(repo, "import", "arrays", str(mine / "teacher.npy"), str(mine / "teacher.csv"),
          "data/import/teacher", "--name", "my-images", "--modality", "image")  # fmt: skip
    _cmkd(repo, "import", "wav", str(mine / "clips"), str(mine / "clips.csv"),
          "data/import/student", "--name", "my-speech", "--labelled-per-class", "4")  # fmt: skip

    lengths = check_dataset(repo / "data" / "import" / "student").manifest["length"]
    assert lengths.max() >= 90 * lengths.drop(lengths.idxmax()).max()  # the long clip is in

    # The user's own teacher, trained elsewhere, exported with features and logits outputs.
    teacher_ds = check_dataset(repo / "data" / "import" / "teacher")
    fitted, data = fit_teacher(teacher_ds, tiny_params.teacher, torch.device("cpu"), False)
    example = data["test"].inputs[0][:4]
    export_teacher_onnx(fitted.model, example, mine / "my_teacher.onnx")

    # Step 2: the teacher file; step 3: params.yaml; step 4: cmkd run.
    shutil.copy(mine / "my_teacher.onnx", repo / "data" / "import" / "teacher.onnx")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "import"
    params["teacher"]["source"] = "onnx"
    params["distill"].update(
        {"model": "sequence_cnn", "epochs": 6, "batch_size": 16, "min_steps": 0}
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run = _cmkd(repo, "run", api_url=api)
    assert "data/export/student.onnx" in run.stdout.splitlines()[-1]
    card = json.loads((repo / "data" / "export" / "model_card.json").read_text())
    assert card["classes"] == ["high", "low", "mid"]  # natural order of the names
    assert card["front_end"]["kind"] == "audio" and card["teacher"]["source"] == "onnx"
    metrics = json.loads((repo / "data" / "evaluate" / "metrics.json").read_text())
    assert metrics["student"]["labelled_train"] == 12

    # Step 5: predict a WAV file with the exported student.
    done = _cmkd(
        repo, "predict", "data/export/student.onnx", str(mine / "clips" / "clip00.wav"), "--json"
    )
    prediction = json.loads(done.stdout)[0]
    assert prediction["class"] in CLASSES
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

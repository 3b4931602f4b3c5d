"""docs/data.md's worked example of a text teacher, step by step, on files this test makes: a
folder of PNG images (three classes) and a texts CSV, ``cmkd run`` in a scratch git repo with
``teacher.source: text``, then ``cmkd predict`` on an image. A stand-in encoder
(tests/text_stand_in.py) takes MiniLM's place, so that no optional install is needed; a CSV
naming a class the images lack stops the run at prepare with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from conftest import TINY, make_scratch_repo
from PIL import Image

from tasks.dvc import stage_environment

TESTS = Path(__file__).resolve().parents[1]
CLASSES = ("bag", "coat", "hat")
TEXTS = {
    "bag": ["a bag", "a leather handbag", "a purse with a strap", "a backpack for school"],
    "coat": ["a coat", "a long winter coat", "a warm jacket", "a padded parka"],
    "hat": ["a hat", "a woollen cap", "a sun hat with a brim", "a baseball cap"],
}


def _images(folder: Path) -> None:
    """60 grey 12x12 PNGs, a bright bar whose row says the class; images.csv: file,label."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        c = i % 3
        image = rng.uniform(0, 60, size=(12, 12))
        image[2 + 4 * c] += 180
        Image.fromarray(image.astype(np.uint8), mode="L").save(folder / f"img{i:03d}.png")
        rows.append({"file": f"img{i:03d}.png", "label": CLASSES[c]})
    pd.DataFrame(rows).to_csv(folder.parent / "images.csv", index=False)


def _texts(path: Path, texts: dict[str, list[str]]) -> None:
    rows = [(label, text) for label, items in texts.items() for text in items]
    pd.DataFrame(rows, columns=["label", "text"]).to_csv(path, index=False)


def _cmkd(repo: Path, *args: str, api_url: str) -> subprocess.CompletedProcess:
    env = stage_environment(api_url)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "cmkd_app.cli", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_texts_and_a_folder_of_images_to_an_exported_student(tmp_path, recordings, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    repo = make_scratch_repo(tmp_path / "repo", recordings, TINY)
    mine = tmp_path / "mine"
    mine.mkdir()
    _images(mine / "images")
    _texts(mine / "texts.csv", TEXTS)

    # 1. The student's images into data/import/student.
    done = _cmkd(repo, "import", "images", str(mine / "images"), str(mine / "images.csv"),
                 "data/import/student", "--name", "my-things", "--labelled-per-class", "4",
                 "--height", "12", "--width", "12", api_url=api)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # 2. The texts; 3. params.yaml (the stand-in encoder in place of the default MiniLM).
    (repo / "data" / "import" / "teacher_texts.csv").write_bytes((mine / "texts.csv").read_bytes())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "import"
    params["teacher"].update({"source": "text", "text_model": "text_stand_in"})
    params["distill"]["model"] = "image_cnn"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    # 4. Run it, then classify an image.
    run = _cmkd(repo, "run", api_url=api)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "data/export/student.onnx" in run.stdout
    assert "class geometry, teacher vs CE-only student: r = " in run.stdout

    teacher = json.loads((repo / "data" / "prepared" / "teacher" / "dataset.json").read_text())
    assert teacher["modality"] == "text" and teacher["sample_shape"] == [32]
    assert teacher["extra"]["text_model"] == "text_stand_in"
    metrics = json.loads((repo / "data" / "evaluate" / "metrics.json").read_text())
    assert -1 <= metrics["class_similarity"]["correlation"] <= 1
    assert 0 < metrics["class_similarity"]["p_value"] <= 1
    card = json.loads((repo / "data" / "export" / "model_card.json").read_text())
    assert card["classes"] == list(CLASSES) and card["teacher"]["source"] == "text"
    done = _cmkd(repo, "predict", "data/export/student.onnx",
                 str(mine / "images" / "img000.png"), "--json", api_url=api)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["class"] in CLASSES
    inspect = _cmkd(repo, "bank", "inspect", api_url=api)
    assert "most similar class" in inspect.stdout and "class geometry" in inspect.stdout

    # A CSV naming a class the images lack: prepare stops, naming the CSV, exit status 2.
    _texts(repo / "data" / "import" / "teacher_texts.csv", {**TEXTS, "shoe": ["a shoe"]})
    bad = _cmkd(repo, "run", api_url=api)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    tail = "\n".join((bad.stdout + bad.stderr).splitlines()[-25:])
    assert "stage 'prepare' failed" in tail
    assert "data/import/teacher_texts.csv" in tail and "'shoe' is not a student class" in tail

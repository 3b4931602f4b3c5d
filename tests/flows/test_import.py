"""``data.source: import``: the prepare and validate flows take the user's imported pair."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from cmkd_core.data import DataContractError
from cmkd_core.data.importers import import_arrays


def _import(root, role, shape, per_class=12, classes=("a", "b", "c")):
    rng = np.random.default_rng(len(role))
    n = per_class * len(classes)
    np.save(root / f"{role}.npy", rng.normal(size=(n, *shape)).astype(np.float32))
    pd.DataFrame({"label": list(classes) * per_class}).to_csv(root / f"{role}.csv", index=False)
    import_arrays(
        root / f"{role}.npy",
        root / f"{role}.csv",
        root / "data" / "import" / role,
        name=role,
        modality=role,
    )


def test_the_pipeline_runs_on_an_imported_pair_by_params_alone(tmp_path, prefect_harness):
    from flows.stages import STAGES, prepare, validate

    _import(tmp_path, "teacher", (6, 6))
    _import(tmp_path, "student", (10,))
    params = {
        "data": {"source": "import", "labelled_per_class": 2},
        "teacher": {"model": "mlp", "epochs": 2, "feature_dim": 16, "device": "cpu"},
        "distill": {"model": "mlp", "epochs": 2, "batch_size": 8, "device": "cpu"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    counts = prepare(root=str(tmp_path))
    assert counts == {"teacher_samples": 36, "student_samples": 36, "student_labelled": 6}
    report = validate(root=str(tmp_path))
    assert report["classes"] == ["a", "b", "c"]
    assert report["teacher"]["sample_shape"] == [6, 6] and report["student"]["labelled_train"] == 6
    saved = json.loads((tmp_path / "data" / "validated" / "report.json").read_text())
    assert saved["student"]["name"] == "student"
    for stage in ("teacher", "distill", "evaluate", "export"):
        STAGES[stage](root=str(tmp_path))
    card = json.loads((tmp_path / "data" / "export" / "model_card.json").read_text())
    assert card["classes"] == ["a", "b", "c"] and card["architecture"]["model"] == "mlp"
    assert card["metrics"]["onnx_test_accuracy"] == card["metrics"]["test_accuracy"]


def test_prepare_without_an_imported_dataset_says_which(tmp_path, prefect_harness):
    from flows.stages import prepare

    _import(tmp_path, "teacher", (4,))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "import"}}))
    with pytest.raises(DataContractError, match=r"data/import/student .*no imported dataset"):
        prepare(root=str(tmp_path))
    assert not (tmp_path / "data" / "prepared" / "teacher").exists()


def test_cmkd_import_wav_takes_the_defaults_front_end_settings(tmp_path, recordings):
    """Your own recordings through the front end the default student was trained with, from
    the command line; a bad setting is refused in one line, exit 2, nothing written."""
    import subprocess
    import sys
    import zipfile

    from cmkd_core.config import DataParams

    clips = tmp_path / "clips"
    clips.mkdir()
    rows = []
    with zipfile.ZipFile(recordings) as archive:
        for digit in range(3):
            for take in range(4):
                name = f"{digit}_theo_{take}.wav"
                (clips / name).write_bytes(archive.read(f"recordings/{name}"))
                rows.append({"file": name, "label": str(digit)})
    pd.DataFrame(rows).to_csv(tmp_path / "clips.csv", index=False)
    settings = ["--sample-rate", "8000", "--n-mels", "26", "--trim-db", "30", "--normalise", "mean"]
    args = ["import", "wav", str(clips), str(tmp_path / "clips.csv"), "--name", "mine"]

    def cmkd(*more):
        command = [sys.executable, "-m", "cmkd_app.cli", *args, *more]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)

    done = cmkd(str(tmp_path / "mine"), *settings)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "mine" / "dataset.json").read_text())
    assert meta["extra"]["front_end"] == DataParams().front_end.to_json()
    bad = cmkd(str(tmp_path / "bad"), *settings, "--trim-db", "-3")
    assert bad.returncode == 2 and "trim_db -3.0 (> 0)" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()

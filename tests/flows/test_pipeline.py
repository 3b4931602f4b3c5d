"""The whole pipeline for real: Prefect flows under a test server, DVC in a scratch git repo,
the exported ONNX file run by onnxruntime; and a bad dataset stopping the run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import TINY, git, make_scratch_repo

from cmkd_core.data.contract import read_dataset
from cmkd_core.data.tensors import samples_of
from cmkd_core.export import onnx_logits
from flows.stages import STAGES
from tasks.dvc import stage_environment

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory, recordings) -> Path:
    """A copy of the committed project in a fresh git repo, with a tiny budget in params.yaml."""
    return make_scratch_repo(tmp_path_factory.mktemp("repo"), recordings, TINY)


@pytest.fixture(scope="module")
def pipeline_run(scratch_repo, prefect_harness):
    from flows.pipeline import pipeline

    return pipeline(root=str(scratch_repo))


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_pipeline_flow_runs_every_stage_and_reports(pipeline_run, scratch_repo):
    metrics = pipeline_run["metrics"]
    assert metrics["method"] == "auto"
    # auto trained every candidate (unlabelled clips exist: sinkhorn_ssl is one) and shipped
    # the best on validation; the shipped student is that candidate's model.
    scores = metrics["candidates_val_accuracy"]
    assert list(scores) == ["ce", "joint", "joint_w0.1", "sinkhorn_ssl"]
    assert scores[metrics["chosen"]] == max(scores.values())
    assert metrics["student"]["val_accuracy"] == scores[metrics["chosen"]]
    selection = json.loads((scratch_repo / "data" / "distill" / "selection.json").read_text())
    assert selection["chosen"] == metrics["chosen"] and selection["candidates"] == scores
    card = json.loads((scratch_repo / "data" / "export" / "model_card.json").read_text())
    assert card["chosen"] == metrics["chosen"] and card["candidates_val_accuracy"] == scores
    for role in ("student", "ce_only"):
        assert 0.1 < metrics[role]["test_accuracy"] <= 1.0
        assert metrics[role]["n_test"] == 500 and metrics[role]["labelled_train"] == 100
    assert metrics["gain_over_ce"]["test_accuracy"] == pytest.approx(
        metrics["student"]["test_accuracy"] - metrics["ce_only"]["test_accuracy"]
    )
    assert metrics["teacher"]["test_accuracy"] > 0.5
    plots = scratch_repo / "data" / "evaluate" / "plots"
    for name in (
        "learning_curves.csv",
        "confusion.csv",
        "learning_curves.png",
        "confusion.png",
        "features_2d.csv",
        "features_2d.png",
    ):
        assert (plots / name).stat().st_size > 0, name
    for role in ("student", "ce_only"):
        assert metrics[role]["fa_distance"] > 0 and 0 <= metrics[role]["la_distance"] <= 1
    assert (plots / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    lock = yaml.safe_load((scratch_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {
        "prepare",
        "validate",
        "teacher",
        "distill",
        "evaluate",
        "export",
    }


def test_a_speaker_never_trained_on_through_cmkd_predict_as_wav_files(
    pipeline_run, scratch_repo, tmp_path
):
    """The exported default takes recordings: the held-out test speaker's 500 WAV files, named
    as a user would, through `cmkd predict` (bench/heldout.py), within 5 points of the test
    accuracy the run reported (the same clips: the front end recorded in the card computes
    their frames exactly as the prepare stage did)."""
    out = tmp_path / "heldout.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "heldout.py"),
            "--root",
            str(scratch_repo),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["files"] == 500 and result["role"] == "never trained on"
    assert result["speaker"] == "george"
    assert abs(result["accuracy"] - result["printed_test_accuracy"]) <= 0.05, result
    card = json.loads((scratch_repo / "data" / "export" / "model_card.json").read_text())
    assert card["front_end"]["kind"] == "audio" and card["speakers"]["test"] == "george"
    assert card["input_check"]["test_flagged"] <= 0.01


def test_a_tone_is_flagged_unusual_and_a_recording_is_not(pipeline_run, scratch_repo, tmp_path):
    import zipfile

    from fastapi.testclient import TestClient
    from scipy.io import wavfile

    from cmkd_core.deploy import Limits, OnnxStudent
    from cmkd_core.deploy.http import create_app

    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 32767).astype(np.int16)
    wavfile.write(tmp_path / "tone.wav", 16000, tone)
    archive = scratch_repo / "data" / "raw" / "fsdd-recordings-1.0.10.zip"
    speech = zipfile.ZipFile(archive).read("recordings/7_george_3.wav")
    (tmp_path / "seven.wav").write_bytes(speech)
    model = "data/export/student.onnx"
    done = _python(scratch_repo, "cmkd_app.cli", "predict", model, str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    flags = {Path(r["input"]).name: r["unusual"] for r in json.loads(done.stdout)}
    assert flags == {"seven.wav": False, "tone.wav": True}
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "tone.wav: unlike the training data (distance" in warnings[0]
    client = TestClient(create_app(OnnxStudent(scratch_repo / model), Limits()))
    for body, unusual in (((tmp_path / "tone.wav").read_bytes(), True), (speech, False)):
        reply = client.post("/v1/predict", content=body, headers={"content-type": "audio/wav"})
        assert reply.status_code == 200 and reply.json()["predictions"][0]["unusual"] is unusual


def test_stages_ran_in_the_pipelines_process_as_its_subflows_and_the_run_timed(
    pipeline_run, scratch_repo
):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    record = json.loads(Path(pipeline_run["record"]).read_text())
    with get_client(sync_client=True) as client:
        for stage in STAGES:
            names = FlowFilter(name=FlowFilterName(any_=[stage]))
            runs = [r for r in client.read_flow_runs(flow_filter=names) if r.parent_task_run_id]
            assert runs, f"no {stage} flow run under a pipeline task"
            parents = {client.read_task_run(r.parent_task_run_id).flow_run_id for r in runs}
            assert record["flow_run_id"] in {str(p) for p in parents}, stage
    timing = record["timing"]
    assert timing["training"] > 0 and timing["parity"] > 0
    rest = timing["wall"] - timing["training"] - timing["parity"]
    assert timing["overhead"] == pytest.approx(rest, abs=0.2)


def test_onnx_student_reproduces_the_reported_test_accuracy(pipeline_run, scratch_repo):
    onnx_path = Path(pipeline_run["onnx"])
    card = json.loads((scratch_repo / "data" / "export" / "model_card.json").read_text())
    dataset = read_dataset(scratch_repo / "data" / "prepared" / "student")
    test = samples_of(dataset, dataset.rows("test"), card["classes"])
    logits = onnx_logits(ort.InferenceSession(str(onnx_path)), test)
    accuracy = float((logits.argmax(1) == test.labels.numpy()).mean())
    assert accuracy == pipeline_run["metrics"]["student"]["test_accuracy"]
    assert card["sha256"] and len(card["params_sha256"]) == 64 and len(card["data_sha256"]) == 64
    assert card["inputs"].keys() == {"x", "lengths"} and card["normalisation"]["inside_graph"]
    assert np.isfinite(card["metrics"]["onnx_max_abs_logit_diff"])


def _python(repo: Path, *args: str, api_url: str | None = None) -> subprocess.CompletedProcess:
    """``python -m ARGS`` in ``repo`` with the stage environment; output captured."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=stage_environment(api_url),
        check=False,
    )


def test_second_dvc_repro_finds_everything_up_to_date(pipeline_run, scratch_repo):
    done = _python(scratch_repo, "dvc", "repro", api_url=_api_url())
    assert done.returncode == 0, done.stderr
    assert "Data and pipelines are up to date." in done.stdout
    assert "Running stage" not in done.stdout


def test_changed_param_reruns_only_what_depends_on_it(pipeline_run, scratch_repo):
    assert "up to date" in _python(scratch_repo, "dvc", "status").stdout
    params = yaml.safe_load((scratch_repo / "params.yaml").read_text())
    params["export"]["atol"] = 0.0002
    (scratch_repo / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        status = _python(scratch_repo, "dvc", "status").stdout
        assert "export:" in status and "distill:" not in status and "teacher:" not in status
    finally:
        params["export"]["atol"] = 0.0001
        (scratch_repo / "params.yaml").write_text(yaml.safe_dump(params))


def test_cmkd_predict_on_the_test_clips_agrees_with_the_metrics(pipeline_run, scratch_repo):
    dataset = read_dataset(scratch_repo / "data" / "prepared" / "student")
    rows = dataset.rows("test")
    clips = scratch_repo / "clips"
    clips.mkdir(exist_ok=True)
    test = samples_of(dataset, rows)
    x, lengths = (t.numpy() for t in test.take(torch.arange(len(test)))[0])
    for i in range(len(rows)):
        np.save(clips / f"{i:04d}.npy", x[i, : lengths[i]])
    done = _python(
        scratch_repo, "cmkd_app.cli", "predict", "data/export/student.onnx", "clips", "--json"
    )
    assert done.returncode == 0, done.stderr
    predicted = [r["class"] for r in json.loads(done.stdout)]
    accuracy = float(
        np.mean([p == label for p, label in zip(predicted, rows["label"], strict=True)])
    )
    assert accuracy == pipeline_run["metrics"]["student"]["test_accuracy"]


def test_int8_model_is_kept_within_its_threshold_and_refused_past_it(pipeline_run, scratch_repo):
    export = scratch_repo / "data" / "export"
    card = json.loads((export / "model_card.json").read_text())
    int8 = card["int8"]
    assert int8["quantized_ops"] == ["MatMul", "Gemm"]
    if int8["written"]:
        assert int8["drop_points"] <= 0.5 and (export / "student.int8.onnx").is_file()
    # Force the gate shut: no int8 model may lose more than -100 points.
    params_file = scratch_repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["export"]["int8_max_drop"] = -100.0
    params_file.write_text(yaml.safe_dump(params))
    try:
        repro = _python(scratch_repo, "dvc", "repro", api_url=_api_url())
        assert repro.returncode == 0, repro.stdout + repro.stderr
        assert "Running stage 'export'" in repro.stdout
        assert "Running stage 'distill'" not in repro.stdout
        refused = json.loads((export / "model_card.json").read_text())["int8"]
        assert refused["written"] is False and "int8_max_drop" in refused["reason"]
        assert refused["test_accuracy"] == int8["test_accuracy"]
        assert not (export / "student.int8.onnx").exists() and (export / "student.onnx").is_file()
    finally:
        params["export"]["int8_max_drop"] = 0.5
        params_file.write_text(yaml.safe_dump(params))
    again = _python(scratch_repo, "dvc", "repro", api_url=_api_url())
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((export / "model_card.json").read_text())["int8"] == int8


def _card(repo: Path) -> dict:
    return json.loads((repo / "data" / "export" / "model_card.json").read_text())


def test_changed_input_retrains_pushes_and_the_card_names_the_run(pipeline_run, scratch_repo):
    from flows.pipeline import pipeline

    first = json.loads(Path(pipeline_run["record"]).read_text())
    # the default remote is a folder on the cache's disk: a run does not copy it all there
    assert first["ran"] == list(STAGES) and first["pulled"] and not first["pushed"]
    remote = scratch_repo / ".cmkd" / "dvc-remote"
    assert not [p for p in remote.rglob("*") if p.is_file()]
    params_file = scratch_repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["distill"]["seed"] = 1
    params_file.write_text(yaml.safe_dump(params))
    try:
        changed = pipeline(root=str(scratch_repo), push_to_same_disk=True)  # cmkd run --push
        assert len([p for p in remote.rglob("*") if p.is_file()]) > 5
        assert "distill" in changed["stale"] and "teacher" not in changed["stale"]
        assert not changed["nothing_to_do"]
        assert changed["ran"] == ["distill", "evaluate", "export"]
        record = json.loads(Path(changed["record"]).read_text())
        assert record["pushed"] and record["flow_run"] != first["flow_run"]
        run = _card(scratch_repo)["run"]
        assert run["pipeline_flow_run"] == record["flow_run"]
        assert run["pipeline_flow_run_id"] == record["flow_run_id"]
    finally:
        params["distill"]["seed"] = 0
        params_file.write_text(yaml.safe_dump(params))
    back = pipeline(root=str(scratch_repo))  # seed 0 again: DVC's run cache has its outputs
    assert "distill" in back["restored"] and "distill" not in back["ran"]
    assert back["metrics"] == pipeline_run["metrics"]


def test_a_run_with_nothing_new_changes_nothing(pipeline_run, scratch_repo):
    from flows.pipeline import pipeline

    def state() -> tuple:
        onnx = scratch_repo / "data" / "export" / "student.onnx"
        lock = scratch_repo / "dvc.lock"
        return onnx.stat().st_mtime_ns, lock.read_bytes(), _card(scratch_repo)

    before = state()
    again = pipeline(root=str(scratch_repo))
    assert again["nothing_to_do"] and again["stale"] == [] and again["ran"] == []
    assert state() == before
    assert json.loads(Path(again["record"]).read_text())["pushed"] is False


def test_dvc_remote_round_trip_restores_the_artifacts(pipeline_run, scratch_repo):
    pushed = _python(scratch_repo, "cmkd_app.cli", "push")
    assert pushed.returncode == 0 and "files pushed" in pushed.stdout, pushed.stderr
    cached = ["data/distill", "data/export", "data/teacher/bank.safetensors", ".dvc/cache"]
    onnx = scratch_repo / "data" / "export" / "student.onnx"
    onnx_bytes = onnx.read_bytes()
    for name in cached:
        path = scratch_repo / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert "deleted" in _python(scratch_repo, "dvc", "status").stdout
    done = _python(scratch_repo, "dvc", "pull")
    assert done.returncode == 0, done.stdout + done.stderr
    assert onnx.read_bytes() == onnx_bytes
    assert "up to date" in _python(scratch_repo, "dvc", "status").stdout


def test_dvc_experiment_over_a_seed_against_a_committed_baseline(pipeline_run, scratch_repo):
    """The README's "Change parameters" workflow: commit the run as the baseline, try a value
    with `dvc exp run -S`, compare with `dvc exp show` and `dvc metrics diff`, go back."""
    git(scratch_repo, "add", "-A")
    git(scratch_repo, "commit", "-qm", "baseline")
    args = ("dvc", "exp", "run", "-S", "distill.seed=2", "-n", "seed2")
    done = _python(scratch_repo, *args, api_url=_api_url())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'distill'" in done.stdout
    assert "Running stage 'teacher'" not in done.stdout
    shown = _python(scratch_repo, "dvc", "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert '"seed2"' in shown.stdout and '"seed": 2' in shown.stdout
    # dvc exp run left the experiment in the workspace: its params and its outputs.
    assert "seed: 2" in (scratch_repo / "params.yaml").read_text()
    diff = _python(scratch_repo, "dvc", "metrics", "diff", "--json")
    assert diff.returncode == 0, diff.stderr
    changed = json.loads(diff.stdout)
    assert any(k.startswith("student.") for k in changed["data/evaluate/metrics.json"]), diff.stdout
    back = subprocess.run(["git", "checkout", "--", "."], cwd=scratch_repo, check=False)
    assert back.returncode == 0
    assert _python(scratch_repo, "dvc", "checkout").returncode == 0
    assert "up to date" in _python(scratch_repo, "dvc", "status").stdout


def test_bad_dataset_stops_the_run_and_leaves_outputs_alone(pipeline_run, scratch_repo):
    student = scratch_repo / "data" / "prepared" / "student"
    report = scratch_repo / "data" / "validated" / "report.json"
    before = report.read_bytes()
    downstream = scratch_repo / "data" / "export" / "student.onnx"
    onnx_before = downstream.read_bytes()
    frames = np.load(student / "frames.npy")
    frames[5, 3] = np.nan
    (student / "frames.npy").chmod(0o644)
    np.save(student / "frames.npy", frames)
    done = _python(scratch_repo, "cmkd_app.cli", "stage", "validate", api_url=_api_url())
    assert done.returncode == 2
    assert "frames.npy column=- row=0 check=finite: NaN or inf values" in done.stderr
    assert report.read_bytes() == before
    # Through DVC, from validate on: the failure stops the chain before any later stage.
    lock_before = yaml.safe_load((scratch_repo / "dvc.lock").read_text())["stages"]
    repro = _python(scratch_repo, "dvc", "repro", "--downstream", "validate", api_url=_api_url())
    assert repro.returncode != 0
    assert "Running stage 'validate'" in repro.stdout
    assert "Running stage 'teacher'" not in repro.stdout
    assert "check=finite" in repro.stdout + repro.stderr
    assert downstream.read_bytes() == onnx_before
    assert not list((scratch_repo / "data").rglob("*.tmp"))
    # What DVC changes, as docs/reliability.md says: it deletes a stage's outputs before it
    # runs the stage, so the report is gone (no report vouches for data that failed), while
    # dvc.lock keeps the last good validation, whose report DVC's cache still holds; every
    # problem is in .cmkd/reports; no later stage's output changed.
    assert not report.exists()
    lock_after = yaml.safe_load((scratch_repo / "dvc.lock").read_text())["stages"]
    assert lock_after["validate"] == lock_before["validate"]
    assert {k: v for k, v in lock_after.items() if k != "prepare"} == {
        k: v for k, v in lock_before.items() if k != "prepare"
    }
    problems = (scratch_repo / ".cmkd" / "reports" / "validation-problems.txt").read_text()
    assert "frames.npy column=- row=0 check=finite" in problems


def _reflinks(folder: Path) -> bool:
    """Whether ``folder``'s file system makes copy-on-write copies (DVC then prefers them)."""
    (folder / "a").write_bytes(b"x")
    done = subprocess.run(["cp", "--reflink=always", folder / "a", folder / "b"], check=False)
    return done.returncode == 0


def test_outputs_are_linked_to_dvcs_cache_not_copied(pipeline_run, scratch_repo, tmp_path):
    for name in ("data/export/student.onnx", "data/teacher/bank.safetensors"):
        output = scratch_repo / name
        linked = [p for p in (scratch_repo / ".dvc" / "cache").rglob("*") if p.is_file()]
        same = [p for p in linked if p.stat().st_ino == output.stat().st_ino]
        assert same or _reflinks(tmp_path), f"{name} is a second copy of its cache file"

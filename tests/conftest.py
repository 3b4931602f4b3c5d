"""Shared fixtures: an isolated Prefect home, the real default pair, tiny parameters."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

# Prefect reads its settings at import: isolate its home before anything imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cmkd-prefect-home-")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# No stage worker outliving a test (cmkd_app/stage_worker.py); test_stage_worker.py turns it on.
os.environ["CMKD_STAGE_WORKER"] = "0"

import tasks  # noqa: F401  (the project's Prefect defaults)
from cmkd_core.config import DataParams, DistillParams, Params, TeacherParams
from cmkd_core.data import write_dataset
from cmkd_core.data.defaults import image_dataset
from cmkd_core.data.fsdd import default_student

ROOT = Path(__file__).resolve().parents[1]
RECORDINGS = ROOT / DataParams().recordings


# The budget of the pipeline runs in scratch repos: a few epochs of each model.
TINY = {
    "teacher": {"epochs": 3, "feature_dim": 32, "warmup_epochs": 1},
    "distill": {
        "epochs": 8,
        "batch_size": 32,
        "warmup_epochs": 1,
        "min_steps": 0,
        "ssl": {"start": 8, "ramp": 8},  # the unlabelled terms act within the tiny budget
    },
}


def git(repo: Path, *args: str) -> None:
    """``git ARGS`` in ``repo`` as a throwaway identity; output captured, failure raised."""
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", *identity, *args], cwd=repo, check=True, capture_output=True)


def make_scratch_repo(repo: Path, recordings: Path, budget: dict | None = None) -> Path:
    """A fresh git repo at ``repo`` holding the committed project (as a fresh clone would),
    the FSDD ``recordings`` in ``data/raw`` and, if given, ``budget`` merged into
    ``params.yaml``."""
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / "data" / "raw").mkdir(parents=True, exist_ok=True)
    shutil.copy2(recordings, repo / "data" / "raw" / recordings.name)
    if budget:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        for section, values in budget.items():
            params[section].update(values)
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-qm", "scratch")):
        git(repo, *args)
    return repo


def process_gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has exited within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def cmkd(repo: Path, *args: str, api_url: str | None = None) -> subprocess.CompletedProcess:
    """``cmkd ARGS`` in ``repo`` as a user would run it (this interpreter, the Prefect API at
    ``api_url`` if given); output captured, the exit status left to the caller."""
    from tasks.dvc import stage_environment

    return subprocess.run(
        [sys.executable, "-m", "cmkd_app.cli", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=stage_environment(api_url),
        check=False,
    )


def start_run(repo: Path, api_url: str) -> subprocess.Popen:
    """``cmkd run`` in ``repo`` in the background, as a terminal's foreground job would run it
    (its own process group, Ctrl-C's default action); output on pipes, text."""
    import signal

    from tasks.dvc import stage_environment

    return subprocess.Popen(
        [sys.executable, "-m", "cmkd_app.cli", "run"],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=stage_environment(api_url),
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def make_trained_project(root: Path, pair_root: Path, params: dict) -> Path:
    """A project at ``root`` with the default pair, ``params`` (a params.yaml mapping), and the
    validate and teacher stages run in this process (a Prefect API must be up)."""
    from flows.stages import teacher, validate

    shutil.copytree(pair_root / "data", root / "data")
    (root / "data" / "raw").mkdir(exist_ok=True)
    shutil.copy2(RECORDINGS, root / "data" / "raw" / RECORDINGS.name)  # for the prepare stage
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    validate(root=str(root))
    teacher(root=str(root))
    return root


@pytest.fixture(scope="session")
def recordings() -> Path:
    """The FSDD recordings committed with the project."""
    if not RECORDINGS.is_file():
        pytest.fail(f"{RECORDINGS} missing: it is committed; git checkout -- {RECORDINGS.name}")
    return RECORDINGS


@pytest.fixture(scope="session")
def pair_root(tmp_path_factory, recordings) -> Path:
    """The real default pair in contract form (10 labelled clips per class), written once
    where the pipeline keeps it: ``data/prepared/{teacher,student}`` under the returned root."""
    root = tmp_path_factory.mktemp("project")
    prepared = root / "data" / "prepared"
    write_dataset(prepared / "teacher", *image_dataset(0.2, 0.2, 0))
    params = DataParams()
    meta, manifest, arrays, labelled = default_student(recordings, params.front_end, 0, 10)
    write_dataset(prepared / "student", meta, manifest, arrays, labelled)
    return root


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    """A budget small enough for tests: a few epochs of each model."""
    return Params(
        teacher=TeacherParams(epochs=3, feature_dim=32, device="cpu"),
        distill=DistillParams(epochs=3, batch_size=32, device="cpu", min_steps=0),
    )


@pytest.fixture(scope="session", autouse=True)
def no_server_left_behind():
    """A command run without a Prefect API starts the shared local server of this session's
    ``PREFECT_HOME`` (cmkd_app/local_server.py); stop it when the tests end."""
    yield
    from cmkd_app.local_server import stop_server

    stop_server(Path(os.environ["PREFECT_HOME"]))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (real server, SQLite)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def export_teacher_onnx():
    """``export(model, example, path, names=("features", "logits"), squash=False)``: a trained
    classifier as an ONNX teacher with a feature output and a logits output (``squash`` makes
    the feature output non-linear in the logits, a teacher the pipeline must refuse)."""
    import torch
    from torch import nn

    class TwoOutputs(nn.Module):
        def __init__(self, model, squash):
            super().__init__()
            self.model, self.squash = model, squash

        def forward(self, x):
            features = self.model.encoder(x)
            return (features**2 if self.squash else features), self.model.head(features)

    def export(model, example, path, names=("features", "logits"), squash=False):
        program = torch.onnx.export(
            TwoOutputs(model, squash).eval(),
            (example,),
            input_names=["x"],
            output_names=list(names),
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            dynamo=True,
            verbose=False,
        )
        program.save(str(path))

    return export

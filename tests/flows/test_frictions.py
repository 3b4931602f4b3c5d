"""Smaller frictions: ``cmkd server`` serves the Prefect dashboard at the address it prints (and
so does the shared local server, where the runs' "View at" links point) and ``cmkd deploy``'s
hint reaches it; a project command outside a project says so in one line and writes nothing,
while ``cmkd predict`` works anywhere and prints a header; a run after a kill says from which
epoch distill resumed; ``features_2d.png`` names its classes and axes at a legible scale."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cmkd, make_scratch_repo
from test_cli_output import _tiny_student
from test_local_server import _ensure

from cmkd_app import deploy as app_deploy
from flows import deploy

HERE = Path(__file__).resolve()


def _outside_env(**extra: str) -> dict[str, str]:
    """The environment of a user with no Prefect settings: no API, Prefect's home defaulting
    to ``.cmkd/prefect`` in the working directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    return {**env, **extra}


def _cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmkd_app.cli", *args],
        cwd=cwd,
        env=_outside_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


NEEDS = {  # the command, and what it says is missing from the folder it was given
    ("run",): "dvc.yaml",
    ("summary",): "dvc.yaml",
    ("server",): "dvc.yaml",
    ("server", "--stop"): "dvc.yaml",
    ("deploy",): "dvc.yaml",
    ("worker",): "dvc.yaml",
    ("stage", "distill"): "dvc.yaml or params.yaml",
    ("bench", "--quick"): "dvc.yaml or params.yaml",
    ("seeds",): "dvc.yaml or params.yaml",
    ("bank", "inspect"): "dvc.yaml or params.yaml",
}


def _refusal(missing: str, root: Path) -> str:
    return f"cmkd: no {missing} in {root}: cd into a cmkd project or pass --root\n"


def test_project_commands_outside_a_project_stop_at_once_and_write_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, missing in NEEDS.items():
        done = _cli(empty, *args)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", _refusal(missing, empty))
        assert list(empty.iterdir()) == [], args  # no .cmkd, no server's state, no log
    # --root names the folder that is not a project, wherever the command runs
    elsewhere = _cli(HERE.parents[2], "run", "--root", str(empty))
    assert (elsewhere.returncode, elsewhere.stderr) == (2, _refusal("dvc.yaml", empty))
    assert list(empty.iterdir()) == []


def test_predict_works_outside_a_project_and_its_table_has_a_header(tmp_path):
    model, empty = tmp_path / "model", tmp_path / "empty"
    model.mkdir()
    empty.mkdir()
    _tiny_student(model / "student.onnx")
    np.save(model / "batch.npy", np.arange(8, dtype="f4").reshape(2, 4))
    done = _cli(empty, "predict", str(model / "student.onnx"), str(model / "batch.npy"))
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split("\t") == ["input", "class", "p(class)", "probabilities"]
    assert [row.split("\t")[0] for row in rows] == [f"{model / 'batch.npy'}[{i}]" for i in (0, 1)]
    assert all(len(row.split("\t")) == 4 for row in rows)
    assert list(empty.iterdir()) == []  # nothing written where it ran


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _page(url: str) -> tuple[int, str]:
    """``GET url`` as a browser asks for a page (redirects followed): status and body."""
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        return response.status, response.read().decode(errors="replace")


def _is_dashboard(url: str) -> bool:
    status, body = _page(url)
    return status == 200 and "<title>Prefect Server</title>" in body


def test_the_shared_local_server_serves_the_dashboard_its_runs_link_to(tmp_path):
    from cmkd_app.local_server import stop_server

    home = tmp_path / "prefect"
    try:
        url, started = _ensure(home, idle=30)
        assert started
        dashboard = url.removesuffix("/api")
        assert _is_dashboard(dashboard)
        assert _is_dashboard(f"{dashboard}/runs/flow-run/00000000-0000-0000-0000-000000000000")
    finally:
        stop_server(home)


def _wait_for_line(log: Path, pattern: str, process: subprocess.Popen) -> re.Match:
    """The first match of ``pattern`` in the file ``log`` that ``process`` writes."""
    while True:
        if found := re.search(pattern, log.read_text(errors="replace")):
            return found
        assert process.poll() is None, log.read_text(errors="replace")
        time.sleep(0.2)


def test_cmkd_server_serves_the_dashboard_and_the_deploy_hint_reaches_it(tmp_path, recordings):
    repo = make_scratch_repo(tmp_path / "repo", recordings)
    port = _free_port()
    env = _outside_env(PREFECT_HOME=str(tmp_path / "home"))
    log = tmp_path / "server.log"
    with log.open("w") as out:  # a file, not a pipe: nothing blocks the server's output
        server = subprocess.Popen(
            [sys.executable, "-m", "cmkd_app.cli", "server", "--port", str(port)],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        printed = _wait_for_line(log, r"dashboard at (http://\S+?),? ", server)[1]
        assert printed == deploy.dashboard_url(port)
        api = deploy.api_url(port)
        deadline = time.monotonic() + 300
        while not deploy.healthy(api):
            assert server.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.5)
        assert _is_dashboard(printed)

        deployed = _cli(repo, "deploy", "--port", str(port), env=env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        hint = deployed.stdout.splitlines()[-1]
        assert hint == app_deploy.deploy_hint(port)
        command = re.search(r"a run now: `(.+)`$", hint)[1]
        assert command == f"PREFECT_API_URL={api} prefect deployment run pipeline/nightly"
        # as typed in a fresh shell: no Prefect settings, another home (no profile to help)
        shell = _outside_env(PREFECT_HOME=str(tmp_path / "other-home"), COLUMNS="300")
        shell["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), shell["PATH"]])
        ran = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=shell, capture_output=True, text=True
        )
        assert ran.returncode == 0 and "Created flow run" in ran.stdout, ran.stdout + ran.stderr
        link = re.search(r"URL: (\S+)", ran.stdout)[1]  # the run's page, as "View at" gives it
        assert link.startswith(f"{printed}/runs/flow-run/") and _is_dashboard(link)
    finally:
        deploy.stop(server)


def _stage_lines(stdout: str) -> dict[str, str]:
    """``cmkd run``'s stage lines by stage."""
    return {line.split()[0]: line for line in stdout.splitlines()[1:7]}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, recordings, prefect_harness) -> tuple[Path, str]:
    """A scratch project whose ``cmkd run`` (distill: ``ce`` only) was killed with SIGKILL
    right after epoch 3 of ``ce`` was saved, then run again: the project and that second
    run's output."""
    from prefect.settings import PREFECT_API_URL

    from tasks.dvc import stage_environment

    budget = {**TINY, "distill": {**TINY["distill"], "method": "ce"}}
    repo = make_scratch_repo(tmp_path_factory.mktemp("resumed"), recordings, budget)
    api = PREFECT_API_URL.value()
    killed = subprocess.Popen(
        [sys.executable, str(HERE.parent / "kill_at.py"), "distill-ce", "3", "saved", "run"],
        cwd=repo,
        env=stage_environment(api),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert killed.wait() == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):  # DVC's `cmkd stage`, if still there
            os.killpg(killed.pid, signal.SIGKILL)
    assert (repo / ".cmkd" / "unfinished" / "distill").exists()
    again = cmkd(repo, "run", api_url=api)
    assert again.returncode == 0, again.stdout + again.stderr
    return repo, again.stdout


def test_a_run_after_a_kill_in_distill_says_from_which_epoch_it_resumed(resumed):
    repo, stdout = resumed
    lines = _stage_lines(stdout)
    assert lines["distill"].split()[1] == "ran"
    assert lines["distill"].endswith("  resumed ce from epoch 4"), stdout
    assert not [s for s, line in lines.items() if "resumed" in line and s != "distill"], stdout
    [record] = (repo / ".cmkd" / "runs").glob("*.json")  # the killed run wrote none
    resumed_runs = json.loads(record.read_text())["resumed"]
    assert resumed_runs == {
        "distill": {"ce": {"from_epoch": 4, "epochs": TINY["distill"]["epochs"]}}
    }
    assert not [p for p in (repo / "data").rglob("*") if "resumed" in p.name]


def test_a_stage_line_names_each_resumed_run_only_when_the_stage_ran(tmp_path):
    from flows.pipeline import stage_line
    from tasks.resumed import add_to_note, clear_note

    (tmp_path / "data").mkdir()  # no outputs: no headline
    add_to_note(tmp_path, "distill", "ce", 17, 16)  # auto's first candidate had finished
    add_to_note(tmp_path, "distill", "joint", 3, 16)
    assert stage_line("distill", "ran", 12.34, tmp_path) == (
        "distill   ran          12.3 s  resumed ce (finished before), joint from epoch 3"
    )
    assert stage_line("distill", "skipped", 0.1, tmp_path) == "distill   up to date    0.1 s"
    clear_note(tmp_path, "distill")
    assert stage_line("distill", "ran", 12.34, tmp_path) == "distill   ran          12.3 s"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_feature_map_names_every_class_and_its_axes_at_a_legible_scale(tmp_path):
    from tasks.evaluate import FEATURE_MAP_DPI, PANEL_INCHES, feature_map_figure

    classes = [f"class {i}" for i in range(12)]
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 20)
    clouds = {  # the students far off and 50 and 1000 times smaller than the teacher's rows
        "teacher": (rng.normal(size=(240, 2)) * 30, labels),
        "student_ce_only": (rng.normal(size=(240, 2)) * 0.03 + 400, labels),
        "student_auto": (rng.normal(size=(240, 2)) * 0.6 - 300, labels),
    }
    titles = {"student_ce_only": "CE-only student", "student_auto": "shipped student"}
    fig = feature_map_figure(clouds, classes, titles)
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == classes
    assert [ax.get_title() for ax in fig.axes] == ["teacher", "CE-only student", "shipped student"]
    for ax, (points, _) in zip(fig.axes, clouds.values(), strict=True):
        assert ax.get_xlabel() and ax.get_ylabel()
        for axis, (low, high) in enumerate((ax.get_xlim(), ax.get_ylim())):
            spread = np.ptp(points[:, axis])  # its own points fill most of its panel
            assert spread > 0.6 * (high - low), (ax.get_title(), axis, spread, low, high)
    fig.savefig(tmp_path / "f.png", dpi=FEATURE_MAP_DPI)
    width, height = _png_size(tmp_path / "f.png")
    assert height == round(PANEL_INCHES[1] * FEATURE_MAP_DPI) >= 450
    assert width == round(fig.get_size_inches()[0] * FEATURE_MAP_DPI) >= 3 * 450


def test_the_evaluate_stage_writes_the_feature_map_at_its_known_size(resumed):
    from tasks.evaluate import FEATURE_MAP_DPI, LEGEND_INCHES, PANEL_INCHES

    repo, _ = resumed
    png = repo / "data" / "evaluate" / "plots" / "features_2d.png"
    panels = 2  # the teacher's bank and the one student of distill.method: ce
    inches = (panels * PANEL_INCHES[0] + LEGEND_INCHES, PANEL_INCHES[1])
    assert _png_size(png) == tuple(round(i * FEATURE_MAP_DPI) for i in inches)

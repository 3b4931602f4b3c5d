"""The nightly deployment for real: a Prefect server on a loopback port, the ``cmkd`` process
work pool, ``prefect deploy`` from ``prefect.yaml``, a worker running the pipeline in a scratch
copy of the project; a second run finds nothing stale."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from uuid import UUID

import psutil
from conftest import make_scratch_repo

from flows import deploy
from flows.stages import STAGES

# Smaller than the pipeline tests' budget: this test is about the deployment machinery.
BUDGET = {
    "teacher": {"epochs": 1, "feature_dim": 16, "warmup_epochs": 0},
    "distill": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0, "min_steps": 0},
}
RUN_TIMEOUT = 360.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _runs_per_flow(url: str) -> Counter:
    """Flow runs on the server that ran (not merely scheduled), by flow name."""
    with deploy.api_client(url) as client:
        names = {f.id: f.name for f in client.read_flows(limit=200)}
        runs = client.read_flow_runs(limit=200)
    return Counter(names[r.flow_id] for r in runs if r.state and r.state.type != "SCHEDULED")


def _durations(url: str, flow_run_id: str) -> str:
    """How long a flow run waited for the worker (created to started) and then ran."""
    with deploy.api_client(url) as client:
        run = client.read_flow_run(UUID(flow_run_id))
    waited = (run.start_time - run.created).total_seconds()
    ran = (run.end_time - run.start_time).total_seconds()
    return f"created to started {waited:.1f} s, flow run itself {ran:.1f} s"


def _tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def test_nightly_deployment_runs_under_a_worker_and_a_second_run_is_a_no_op(tmp_path, recordings):
    already = {p.pid for p in psutil.Process().children(recursive=True)}
    repo = make_scratch_repo(tmp_path / "repo", recordings, BUDGET)
    home = tmp_path / "prefect-home"
    port = _free_port()
    url = deploy.api_url(port)
    env = deploy.server_env(home, port)
    worker_log = tmp_path / "worker.log"
    started: list[subprocess.Popen] = []
    stopped: list[int] = []
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        started.append(deploy.start_server(home, port, env=env, timeout=180))
        timings["server start"] = time.monotonic() - t0
        print(f"\n[deploy e2e] server start (SQLite, fresh home): {timings['server start']:.1f} s")

        assert deploy.ensure_pool("cmkd", url=url) is True
        assert deploy.ensure_pool("cmkd", url=url) is False  # idempotent
        with deploy.api_client(url) as client:
            pool = client.read_work_pool("cmkd")
        assert pool.type == "process"

        output = deploy.deploy(repo, env=env)
        assert "pipeline/nightly" in output
        with deploy.api_client(url) as client:
            found = client.read_deployment_by_name("pipeline/nightly")
        assert found.work_pool_name == "cmkd"
        assert found.entrypoint == "flows/pipeline.py:pipeline"
        assert found.parameters == {"root": "."}
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in found.schedules] == [
            ("0 2 * * *", "UTC", True)
        ]
        assert found.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $CMKD_ROOT }}"}}
        ]

        started.append(
            deploy.start_worker("cmkd", root=repo, env=env, log=worker_log, poll_seconds=2)
        )

        t0 = time.monotonic()
        first = deploy.trigger("pipeline/nightly", {"root": "."}, url=url)
        state = deploy.wait(first, timeout=RUN_TIMEOUT, url=url)
        timings["first run"] = time.monotonic() - t0
        print(
            f"[deploy e2e] first run (every stage), trigger to {state}: "
            f"{timings['first run']:.1f} s ({_durations(url, first)})"
        )
        assert state == "Completed", _tail(worker_log)

        metrics = json.loads((repo / "data" / "evaluate" / "metrics.json").read_text())
        assert (
            metrics["method"] == "auto" and 0 <= metrics["student"]["test_accuracy"] <= 1
        )  # 2 epochs: chance
        onnx = repo / "data" / "export" / "student.onnx"
        assert onnx.stat().st_size > 0
        assert _runs_per_flow(url) == Counter({"pipeline": 1, **dict.fromkeys(STAGES, 1)})

        listed = _run(
            [sys.executable, "-m", "prefect", "flow-run", "ls", "--flow-name", "pipeline"],
            repo,
            {**env, "COLUMNS": "250"},
        )
        assert listed.returncode == 0, listed.stderr
        rows = [line for line in listed.stdout.splitlines() if first in line]
        assert len(rows) == 1 and "COMPLETED" in rows[0], listed.stdout

        onnx_mtime = onnx.stat().st_mtime_ns
        lock = (repo / "dvc.lock").read_bytes()
        t0 = time.monotonic()
        second = deploy.trigger("pipeline/nightly", {"root": "."}, url=url)
        state = deploy.wait(second, timeout=RUN_TIMEOUT, url=url)
        timings["second run"] = time.monotonic() - t0
        print(
            f"[deploy e2e] second run (no-op), trigger to {state}: "
            f"{timings['second run']:.1f} s ({_durations(url, second)})"
        )
        assert state == "Completed", _tail(worker_log)
        assert second != first
        assert onnx.stat().st_mtime_ns == onnx_mtime
        assert (repo / "dvc.lock").read_bytes() == lock
        # No stage flow ran again: DVC skipped every stage.
        assert _runs_per_flow(url) == Counter({"pipeline": 2, **dict.fromkeys(STAGES, 1)})
        status = _run([sys.executable, "-m", "dvc", "status"], repo, env)
        assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout
    finally:
        for proc in reversed(started):
            stopped += deploy.stop(proc)
    print(f"[deploy e2e] stopped processes: {len(stopped)}")
    assert started and all(proc.returncode is not None for proc in started)
    left = [pid for pid in stopped if psutil.pid_exists(pid) and not _zombie(pid)]
    assert left == []
    children = {p.pid for p in psutil.Process().children(recursive=True) if not _zombie(p.pid)}
    assert children <= already  # only what other tests' fixtures started (a Prefect harness)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True

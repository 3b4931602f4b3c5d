"""Fewer processes and servers per run: a stage command that DVC starts under ``cmkd run`` has
its stage run in the pipeline's process (tasks/stage_host.py); without a configured Prefect
API, ``cmkd`` commands share one local server that stops when idle (cmkd_app/local_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import make_scratch_repo, process_gone

from cmkd_app.local_server import INFO, stop_server
from cmkd_app.stage import delegate_to_host as delegate
from tasks.stage_host import VARIABLE, StageHost


def test_a_delegated_stage_runs_in_the_hosts_process_with_its_status_and_run_name(
    tmp_path, monkeypatch
):
    seen = []

    def runner(stage: str, root: Path) -> int:
        seen.append((stage, Path.cwd(), root, os.environ.get("CMKD_RUN_NAME"), os.getpid()))
        return 2

    host = StageHost(tmp_path, runner)
    try:
        monkeypatch.setenv(VARIABLE, host.path)
        monkeypatch.setenv("CMKD_RUN_NAME", "brave-otter")
        served = threading.Thread(target=host.answer)
        served.start()
        assert delegate("validate", str(tmp_path)) == 2
        served.join(10)
        assert seen == [("validate", tmp_path.resolve(), Path("."), "brave-otter", os.getpid())]
        assert host.ran == ["validate"]
        # a stage command for another project is declined: it runs the stage itself
        other = tmp_path / "other"
        other.mkdir()
        served = threading.Thread(target=host.answer)
        served.start()
        assert delegate("validate", str(other)) is None
        served.join(10)
        assert len(seen) == 1
    finally:
        host.close()
    assert delegate("validate", str(tmp_path)) is None  # the host is gone: run it here
    monkeypatch.delenv(VARIABLE)
    assert delegate("validate", str(tmp_path)) is None  # no host at all


def _env(home: Path, idle: float, cache: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(home), "CMKD_SERVER_IDLE_SECONDS": str(idle)})
    if cache is not None:
        env["CMKD_CACHE_DIR"] = str(cache)
    return env


def _ensure(home: Path, idle: float, cache: Path | None = None) -> tuple[str, bool]:
    code = (
        "import json; from cmkd_app.local_server import ensure_server as e; print(json.dumps(e()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(home, idle, cache),
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    url, started = json.loads(done.stdout.strip().splitlines()[-1])
    return url, started


def test_the_shared_server_starts_once_is_reused_and_stops_when_idle(tmp_path):
    home = tmp_path / "prefect"
    try:
        url, started = _ensure(home, idle=4)
        assert started
        pid = json.loads((home / INFO).read_text())["pid"]
        again, started = _ensure(home, idle=4)
        assert (again, started) == (url, False)
        assert json.loads((home / INFO).read_text())["pid"] == pid
        assert not list((home / "leases").iterdir())  # both commands have exited
        assert process_gone(pid, timeout=60), "the idle server did not stop"
        assert not (home / INFO).exists()
    finally:
        stop_server(home)


def test_a_new_projects_server_starts_from_the_first_ones_migrated_database(tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cache = tmp_path / "cache"
    homes = [tmp_path / "first" / "prefect", tmp_path / "second" / "prefect"]
    try:
        said, block_types = [], []
        for home in homes:
            url, started = _ensure(home, idle=30, cache=cache)
            assert started
            said.append((home / "local-server.log").read_text())
            with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as c:
                block_types.append(sorted(b.slug for b in c.read_block_types()))
                flow_id = c.create_flow_from_name("check")
                assert [f.id for f in c.read_flows()] == [flow_id]  # its own, empty database
        [template] = (cache / "prefect-db").glob("prefect-*.db")
        assert f"database: migrated, template kept at {template}" in said[0]
        assert f"database: copied from {template}" in said[1]
        assert block_types[0] == block_types[1] and "secret" in block_types[1]
    finally:
        for home in homes:
            stop_server(home)


def test_a_bare_dvc_repro_starts_one_server_for_all_its_stages(tmp_path, recordings):
    repo = make_scratch_repo(tmp_path / "repo", recordings)
    home = repo / ".cmkd" / "prefect"
    env = _env(home, idle=30)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "validate"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "Running stage 'prepare'" in output and "Running stage 'validate'" in output
        assert "Starting temporary server" not in output
        info = json.loads((home / INFO).read_text())
        assert output.count(info["url"].removesuffix("/api")) == 2  # both stages, one server

        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with (
            temporary_settings({PREFECT_API_URL: info["url"]}),
            get_client(sync_client=True) as client,
        ):
            names = sorted(run.name for run in client.read_flows())
        assert {"prepare", "validate"} <= set(names)
    finally:
        assert stop_server(home) is not None
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)

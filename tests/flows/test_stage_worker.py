"""A bare ``dvc repro`` hands its later stages to the project's stage worker, which runs each
in a forked child writing to the stage command's own output (cmkd_app/stage_worker.py); the stage
dies with its command; a command with other settings is declined and runs its stage itself."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import make_scratch_repo, process_gone

from tasks.dvc import stage_environment

CMKD = str(Path(sys.executable).parent / "cmkd")  # as DVC runs it (the installed command)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_later_stages_run_in_the_worker_die_with_their_command_and_other_settings_are_declined(
    tmp_path, recordings, prefect_harness
):
    from prefect.settings import PREFECT_API_URL

    repo = make_scratch_repo(tmp_path / "repo", recordings)
    env = stage_environment(PREFECT_API_URL.value())
    env.update({"CMKD_STAGE_WORKER": "1", "CMKD_STAGE_WORKER_IDLE_SECONDS": "120"})
    log = repo / ".cmkd" / "stage-worker.log"
    worker = None
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "validate"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        said = log.read_text()
        worker = int(re.search(r"stage worker (\d+) for", said).group(1))
        assert f"for {repo.resolve()}" in said
        # prepare ran in its own process (it started the worker); validate in the worker,
        # its flow's log in DVC's output all the same
        assert "['stage', 'validate'] exited 0" in said and "'prepare'" not in said, said
        assert re.search(r"Beginning flow run .* for flow 'validate'", output), output
        assert (repo / "data" / "validated" / "report.json").is_file()

        stage = subprocess.Popen(
            [CMKD, "stage", "teacher"],
            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for(lambda: _children(worker), 60, "the worker's child")
        [child] = _children(worker)
        time.sleep(1.0)  # into the stage
        stage.send_signal(signal.SIGKILL)
        stage.wait(10)
        assert process_gone(child, timeout=10), "the stage outlived its killed command"
        _wait_for(lambda: "['stage', 'teacher'] exited -9" in log.read_text(), 10, "the log")
        assert not (repo / "data" / "teacher" / "bank.safetensors").exists()

        env["CMKD_SOME_SETTING"] = "another"  # a setting the worker does not share
        done = subprocess.run(
            [CMKD, "stage", "validate"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "code or settings changed, exiting" in log.read_text()
        assert process_gone(worker, timeout=10)
    finally:
        subprocess.run(["pkill", "-f", f"stage_worker.* {repo.resolve()}$"], check=False)

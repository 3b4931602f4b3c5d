"""``cmkd run`` interrupted (Ctrl-C) in the middle of ``auto``'s distill, after some candidates
are done: the next ``cmkd run``, or a bare ``dvc repro``, finishes and gives the same students,
metrics and ONNX file as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY, cmkd, make_scratch_repo, process_gone, start_run

BUDGET = {**TINY, "distill": {**TINY["distill"], "epochs": 16}}
PROGRESS_S = 300
"""Longest wait without a new file in ``data/distill`` or a new checkpoint: a stage that still
writes is alive, however loaded the machine (no wall-clock bound on the whole run)."""


def _results(repo: Path) -> dict:
    """What a run leaves that must not depend on an interruption: metrics, the students'
    weights and histories, the ONNX file."""
    files = [repo / "data" / "evaluate" / "metrics.json", repo / "data" / "export" / "student.onnx"]
    files += sorted((repo / "data" / "distill").iterdir())
    return {str(p.relative_to(repo)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, recordings, prefect_harness) -> dict:
    from prefect.settings import PREFECT_API_URL

    repo = make_scratch_repo(tmp_path_factory.mktemp("uninterrupted"), recordings, BUDGET)
    done = cmkd(repo, "run", api_url=PREFECT_API_URL.value())
    assert done.returncode == 0, done.stdout + done.stderr
    return _results(repo)


def _progress(repo: Path) -> tuple:
    distill = repo / "data" / "distill"
    checkpoints = repo / ".cmkd" / "checkpoints"
    files = [*distill.glob("*"), *checkpoints.glob("*.pt")] if distill.exists() else []
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in files if p.exists()))


def _interrupt_after(repo: Path, candidates: int) -> list[str]:
    """Start ``cmkd run``, Ctrl-C it once ``candidates`` of ``auto``'s students are written;
    return the names written by then."""
    from prefect.settings import PREFECT_API_URL

    run = start_run(repo, PREFECT_API_URL.value())
    histories = repo / "data" / "distill"
    seen, last_change = _progress(repo), time.monotonic()
    try:
        while run.poll() is None and len(list(histories.glob("history_*.json"))) < candidates:
            now = _progress(repo)
            if now != seen:
                seen, last_change = now, time.monotonic()
            assert time.monotonic() - last_change < PROGRESS_S, "no progress"
            time.sleep(0.02)
        assert run.poll() is None, "the run ended before it was interrupted"
        written = sorted(p.name for p in histories.glob("history_*.json"))
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground job
        assert run.wait(timeout=120) == 130, run.stderr.read()
    finally:
        if run.poll() is None:  # never leave a process behind
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert process_gone(run.pid, 10)
    return written


@pytest.mark.parametrize("then", ["cmkd run", "dvc repro"])
def test_a_run_interrupted_after_some_candidates_finishes_next_time_the_same(
    tmp_path, recordings, prefect_harness, reference, then
):
    from prefect.settings import PREFECT_API_URL

    from tasks.dvc import stage_environment

    repo = make_scratch_repo(tmp_path / "repo", recordings, BUDGET)
    written = _interrupt_after(repo, 2)
    assert 2 <= len(written) < 4, written  # some of auto's four candidates, not all
    assert (repo / ".cmkd" / "unfinished" / "distill").exists()
    if then == "cmkd run":
        again = cmkd(repo, "run", api_url=PREFECT_API_URL.value())
        output = again.stdout + again.stderr
        assert again.returncode == 0, output
        log = repo / again.stdout.splitlines()[0].split("full log: ")[1].rstrip(")")
        assert "distill: its last run did not finish; removed its partial outputs" in (
            log.read_text()
        )
    else:
        again = subprocess.run(
            ["dvc", "repro"],
            cwd=repo,
            capture_output=True,
            text=True,
            env=stage_environment(PREFECT_API_URL.value()),
            check=False,
        )
        assert again.returncode == 0, again.stdout + again.stderr
    assert not (repo / ".cmkd" / "unfinished").exists() or not any(
        (repo / ".cmkd" / "unfinished").iterdir()
    )
    results = _results(repo)
    assert results.keys() == reference.keys()
    differ = [name for name in results if results[name] != reference[name]]
    assert differ == [], f"interrupted after {written}: these differ from an uninterrupted run"
    metrics = json.loads(results["data/evaluate/metrics.json"])
    assert metrics == json.loads(reference["data/evaluate/metrics.json"])

"""The default's one raw input, the FSDD recordings, missing: `cmkd run` and `dvc repro` alike
say how to restore it, exit 2 from cmkd, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys

from conftest import cmkd, make_scratch_repo

from tasks.dvc import stage_environment

HINT = "git checkout -- data/raw/fsdd-recordings-1.0.10.zip"


def test_missing_recordings_give_the_restore_hint_from_cmkd_run_and_dvc_repro(
    tmp_path, recordings, prefect_harness
):
    from prefect.settings import PREFECT_API_URL

    repo = make_scratch_repo(tmp_path / "repo", recordings)
    (repo / "data" / "raw" / recordings.name).unlink()
    run = cmkd(repo, "run", api_url=PREFECT_API_URL.value())
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert HINT in "\n".join(out.splitlines()[-10:]) and "Traceback" not in out
    assert "fsdd-recordings-1.0.10.zip column=- row=- check=exists: not found" in out
    assert not (repo / "data" / "prepared" / "student").exists()
    repro = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=stage_environment(PREFECT_API_URL.value()),
    )
    assert repro.returncode != 0
    assert HINT in repro.stdout + repro.stderr
    assert "Errno 2" not in repro.stdout + repro.stderr

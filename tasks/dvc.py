"""Task of the ``pipeline`` flow: let DVC decide what is stale and reproduce one stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE


class StageFailedError(RuntimeError):
    """``dvc repro`` of a stage exited non-zero."""


def stage_environment(api_url: str | None) -> dict[str, str]:
    """The environment for DVC and the stage commands it runs: this interpreter's ``bin`` first
    on PATH (so ``cmkd`` resolves) and, if given, the Prefect API the stage flows report to."""
    env = os.environ.copy()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@task(name="dvc-repro", cache_policy=NONE)
def reproduce_stage(stage: str, root: Path, api_url: str | None) -> None:
    """Run ``dvc repro --single-item STAGE`` in ``root``; DVC skips it when nothing changed."""
    get_run_logger().info("dvc repro %s", stage)
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    done = subprocess.run(command, cwd=root, env=stage_environment(api_url), check=False)
    if done.returncode != 0:
        raise StageFailedError(
            f"stage {stage!r} failed: `dvc repro {stage}` exited {done.returncode}"
        )

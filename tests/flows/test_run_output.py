"""What ``cmkd run`` prints: a student class the teacher lacks stops the run at validate with
exit status 2, the class named once and the user's file named, no traceback; a stage's lines
come one per stage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from conftest import cmkd, make_scratch_repo


def _arrays(folder: Path, name: str, classes: tuple[str, ...]) -> None:
    rng = np.random.default_rng(0)
    labels = [classes[i % len(classes)] for i in range(12 * len(classes))]
    np.save(folder / f"{name}.npy", rng.normal(size=(len(labels), 8, 8)).astype(np.float32))
    pd.DataFrame({"label": labels}).to_csv(folder / f"{name}.csv", index=False)


def test_a_class_only_the_student_has_exits_2_naming_it_and_the_users_file(
    tmp_path, recordings, prefect_harness
):
    from prefect.settings import PREFECT_API_URL

    repo = make_scratch_repo(tmp_path / "repo", recordings)
    mine = tmp_path / "mine"
    mine.mkdir()
    _arrays(mine, "teacher", ("bag", "coat"))
    _arrays(mine, "student", ("bag", "coat", "hat"))
    for role in ("teacher", "student"):
        npy, csv, out = mine / f"{role}.npy", mine / f"{role}.csv", f"data/import/{role}"
        args = ["--name", f"my-{role}", "--modality", "image"]
        done = cmkd(repo, "import", "arrays", str(npy), str(csv), out, *args)
        assert done.returncode == 0, done.stderr
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "import"
    params["distill"]["model"] = "image_cnn"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    run = cmkd(repo, "run", api_url=PREFECT_API_URL.value())
    assert run.returncode == 2, run.stdout + run.stderr
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-25:])
    assert "classes only here: ['hat']" in tail
    assert "file=data/import/student/dataset.json" in tail  # the user's copy, not prepared/
    assert "data/prepared" not in tail
    assert "Traceback" not in run.stdout + run.stderr
    assert (run.stdout + run.stderr).count("hat") == 1  # one violation, not one per row
    # Before the error: one header line and one line per stage that ran.
    lines = run.stdout.splitlines()
    assert lines[0].startswith("cmkd run: stage, outcome, seconds (full log: ")
    assert [line.split()[0] for line in lines[1:]] == ["prepare"]
    log = repo / lines[0].split("full log: ")[1].rstrip(")")
    assert "Traceback" in log.read_text()  # the detail is kept, in the run's log file


def _epoch(checkpoint: Path) -> int:
    """The last epoch saved in a resume checkpoint (0: none yet, or being replaced)."""
    import torch

    try:
        return int(torch.load(checkpoint, weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def test_ctrl_c_stops_the_run_at_once_with_status_130_and_a_later_run_finishes(
    tmp_path, recordings, prefect_harness
):
    import signal

    import psutil
    from conftest import TINY, process_gone, start_run
    from prefect.settings import PREFECT_API_URL

    budget = {**TINY, "distill": {**TINY["distill"], "epochs": 120, "method": "ce"}}
    repo = make_scratch_repo(tmp_path / "repo", recordings, budget)
    run = start_run(repo, PREFECT_API_URL.value())
    checkpoint = repo / ".cmkd" / "checkpoints" / "distill-ce.pt"
    while run.poll() is None and _epoch(checkpoint) < 40:  # a third of the way into distill
        time.sleep(0.1)
    stage = psutil.Process(run.pid).children(recursive=True)  # DVC's shell, `cmkd stage`
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C sends
    assert run.wait(timeout=20) == 130
    err = run.stderr.read()
    assert err.strip().splitlines()[-1] == "cmkd: interrupted", err
    assert "Traceback" not in err and err.count("interrupted") == 1, err
    assert stage and all(process_gone(child.pid, 10) for child in stage)

    again = cmkd(repo, "run", api_url=PREFECT_API_URL.value())
    assert again.returncode == 0, again.stdout + again.stderr
    outcomes = {line.split()[0]: line.split()[1] for line in again.stdout.splitlines()[1:7]}
    assert outcomes == {
        "prepare": "up",
        "validate": "up",
        "teacher": "up",
        "distill": "ran",
        "evaluate": "ran",
        "export": "ran",
    }, again.stdout

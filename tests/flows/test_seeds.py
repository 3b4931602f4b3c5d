"""Seeds of the distill stage on a local Dask cluster (prefect-dask) give exactly what the same
task gives in this process, each run in a worker process of the cluster."""

from __future__ import annotations

import json
import os
import shutil
import statistics

import pytest
import torch
import yaml

from cmkd_app.cli import main
from cmkd_core.bank import save_bank
from cmkd_core.data import check_dataset
from cmkd_core.distill import extract_bank
from cmkd_core.recipes import fit_teacher
from flows.seeds import train_seed
from tasks.layout import Layout


@pytest.fixture(scope="module")
def project(tmp_path_factory, pair_root, tiny_params):
    """A project root with the real default pair, a tiny budget and a bank of a teacher trained
    for one epoch (what the teacher stage would leave there)."""
    root = tmp_path_factory.mktemp("seeds")
    shutil.copytree(pair_root / "data", root / "data")
    params = tiny_params.model_dump(mode="json")
    params["teacher"]["epochs"], params["distill"]["epochs"] = 1, 2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    layout = Layout(root)
    teacher = check_dataset(layout.teacher_data)
    fitted, _ = fit_teacher(teacher, tiny_params.teacher, torch.device("cpu"), progress=False)
    save_bank(extract_bank(fitted.model, teacher, {"source": "test"}), layout.bank)
    return root


def test_seeds_on_a_local_dask_cluster_equal_the_same_task_in_process(
    project, prefect_harness, capsys
):
    argv = ["seeds", "--root", str(project), "--seeds", "0", "1", "--methods", "ce"]
    assert main([*argv, "--workers", "2"]) == 0
    assert "ce  test accuracy" in capsys.readouterr().out
    result = json.loads((project / ".cmkd" / "seeds.json").read_text())
    runs = result["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("ce", 0), ("ce", 1)]
    assert all(r["worker_pid"] != os.getpid() for r in runs)  # ran in the cluster's processes
    here = train_seed(str(project), "ce", 1)
    for key in ("best_epoch", "val_accuracy", "test_accuracy"):
        assert runs[1][key] == here[key], key
    summary = result["summary"]["ce"]
    assert summary["mean"] == pytest.approx(statistics.fmean(summary["test_accuracy"]))
    assert summary["std"] == pytest.approx(statistics.stdev(summary["test_accuracy"]))

"""``cmkd bench`` end to end on a tiny grid: a Prefect flow whose teachers and runs are tasks on
a local Dask cluster (or one after another in this process), the runs file, resume, the bank
cache, a worker killed mid-grid."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cmkd_app.cli import main
from cmkd_core.benchmark.runs import STUDENT_DATA, same_settings
from cmkd_core.config import DataParams, DistillParams, TeacherParams


def _bench(root, *extra: str) -> dict:
    argv = ["bench", "--root", str(root), "--pairs", "digits->fsdd", "--methods", "ce", "la"]
    argv += ["--budgets", "5", "--seeds", "2", "--jobs", "2", "--out", str(root / "out")]
    assert main([*argv, "--name", "t", *extra]) == 0
    return json.loads((root / "out" / "t.json").read_text())


def _params(root: Path, tiny_params, recordings, **distill) -> None:
    params = tiny_params.model_dump(mode="json")
    params["data"]["recordings"] = str(recordings)  # outside root's data/, on purpose
    params["allow_paths_outside_data"] = True
    params["distill"].update(distill)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _without_seconds(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]


def test_bench_runs_on_dask_workers_then_resumes_without_training_again(
    tmp_path, recordings, tiny_params, prefect_harness
):
    _params(tmp_path, tiny_params, recordings)

    first = _bench(tmp_path)
    keys = [(r["seed"], r["method"], r["control"]) for r in first["runs"]]
    # Table order whatever order the workers finished in; la has its shuffled control.
    assert keys == [
        (0, "ce", ""),
        (0, "la", ""),
        (0, "la", "shuffled"),
        (1, "ce", ""),
        (1, "la", ""),
        (1, "la", "shuffled"),
    ]
    assert first["resumed_runs"] == 0
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in first["runs"])
    banks = list((tmp_path / ".cmkd" / "bench" / "banks").glob("digits-*.safetensors"))
    assert len(banks) == 1
    runs_file = tmp_path / "out" / "t.runs.jsonl"
    assert len(runs_file.read_text().splitlines()) == 6

    # A kill mid-write leaves a torn last line: the rerun skips it and trains nothing.
    with runs_file.open("a") as fh:
        fh.write('{"settings": {"distill"')
    stamp = banks[0].stat().st_mtime_ns
    again = _bench(tmp_path, "--resume")
    assert again["resumed_runs"] == 6
    assert again["runs"] == first["runs"]
    assert banks[0].stat().st_mtime_ns == stamp  # the teacher came from the cache

    # A changed param is another experiment: nothing of the first is reused.
    changed = _bench(tmp_path, "--resume", "--set", "w_la=0.5")
    assert changed["resumed_runs"] == 0
    assert changed["grid"]["distill"]["w_la"] == 0.5
    lines = runs_file.read_text().splitlines()
    assert len(lines) == 6 + 1 + 6  # the torn line stayed alone on its line
    assert all(json.loads(line) for line in lines[7:])

    # Without --resume the runs file starts afresh (new code must not reuse old runs); one job
    # runs everything in this process, in the same table order, to the same numbers: every
    # task trains on one thread wherever it runs.
    afresh = _bench(tmp_path, "--jobs", "1")
    assert afresh["resumed_runs"] == 0
    assert _without_seconds(afresh["runs"]) == _without_seconds(first["runs"])
    assert len(runs_file.read_text().splitlines()) == 6

    # Each run is a task run of the grid's flow, named by what it is.
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        named = FlowFilter(name=FlowFilterName(any_=["bench-grid"]))
        grids = {g.id for g in client.read_flow_runs(flow_filter=named)}
        names = {t.name for t in client.read_task_runs() if t.flow_run_id in grids}
    tags = ("ce", "la", "la+shuffled")
    expected = {f"digits->fsdd unpaired b5 {m} s{s}" for m in tags for s in (0, 1)}
    assert expected <= names


def test_runs_made_before_a_param_existed_count_as_made_with_its_default():
    now = {
        "distill": DistillParams().model_dump(mode="json", exclude={"threads"}),
        "teacher": TeacherParams().model_dump(mode="json", exclude={"threads"}),
        "data": DataParams().model_dump(mode="json", include=STUDENT_DATA),
    }
    older = copy.deepcopy(now)
    del older["distill"]["ssl"]["center"], older["distill"]["min_steps"]
    assert same_settings(older, now)
    older["distill"]["ssl"]["temperature"] = 0.2
    assert not same_settings(older, now)
    assert not same_settings({"distill": {"no_such_key": 1}}, now)
    assert not same_settings({}, now)


def test_spoken_digit_runs_count_only_when_made_from_the_same_recordings_and_front_end():
    now = {
        "distill": DistillParams().model_dump(mode="json", exclude={"threads"}),
        "teacher": TeacherParams().model_dump(mode="json", exclude={"threads"}),
        "data": DataParams().model_dump(mode="json", include=STUDENT_DATA),
    }
    sequentia = {k: v for k, v in now.items() if k != "data"}  # before the recordings
    assert not same_settings(sequentia, now, "digits->fsdd")
    assert same_settings(sequentia, now, "mnist->mnist8x8")  # its data did not change
    other = copy.deepcopy(now)
    other["data"]["front_end"]["features"] = "logmel"
    assert not same_settings(other, now, "digits->fsdd")
    assert same_settings(copy.deepcopy(now), now, "digits->fsdd")


def test_a_pair_whose_optional_parts_are_missing_is_skipped_with_its_reason(
    tmp_path, monkeypatch, capsys, recordings, tiny_params
):  # (no flow starts, so no Prefect API is needed)
    import cmkd_core.data.fashion as fashion

    monkeypatch.setattr(fashion, "FOLDER", tmp_path / "no-fashion-here")
    params = tiny_params.model_dump(mode="json")
    params["data"]["recordings"] = str(recordings)
    params["allow_paths_outside_data"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["bench", "--root", str(tmp_path), "--pairs", "text->fashion", "--methods", "ce"]
    argv += ["--budgets", "5", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"skipping text->fashion: no Fashion-MNIST under {tmp_path / 'no-fashion-here'} "
        "(apt install dataset-fashion-mnist)"
    )
    assert out[1] == "cmkd bench: none of the pairs asked for can run here"
    assert not (tmp_path / "out").exists()


def _worker_pids(parent: int) -> list[int]:
    """The Dask worker processes under ``parent`` (the spawned children of its nannies)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and "spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_worker_killed_mid_grid_the_grid_still_completes_each_run_recorded_once(
    tmp_path, recordings, tiny_params, prefect_harness
):
    from prefect.settings import PREFECT_API_URL

    _params(tmp_path, tiny_params, recordings, epochs=12)
    argv = ["bench", "--root", str(tmp_path), "--pairs", "digits->fsdd", "--methods", "ce", "la"]
    argv += ["--budgets", "5", "--seeds", "4", "--jobs", "2", "--out", str(tmp_path / "out")]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    bench = subprocess.Popen(
        [sys.executable, "-m", "cmkd_app.cli", *argv, "--name", "k"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    runs_file = tmp_path / "out" / "k.runs.jsonl"
    deadline = time.monotonic() + 300
    killed = None
    while bench.poll() is None and time.monotonic() < deadline:
        lines = runs_file.read_text().splitlines() if runs_file.exists() else []
        workers = _worker_pids(bench.pid)
        if 1 <= len(lines) < 10 and len(workers) == 2:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.1)
    output = bench.communicate(timeout=600)[0].decode()
    assert killed is not None, "no worker was killed mid-grid:\n" + output
    assert bench.returncode == 0, output
    keys = [
        tuple(json.loads(line)["record"][k] for k in ("seed", "method", "control"))
        for line in runs_file.read_text().splitlines()
    ]
    assert sorted(keys) == sorted(
        (s, m, c) for s in range(4) for m, c in (("ce", ""), ("la", ""), ("la", "shuffled"))
    )  # every run, each once
    result = json.loads((tmp_path / "out" / "k.json").read_text())
    assert len(result["runs"]) == 12


def test_a_grid_with_classes_left_without_labels_reports_them_and_keys_its_runs_apart(
    tmp_path, recordings, tiny_params, prefect_harness
):
    _params(tmp_path, tiny_params, recordings)
    hidden = _bench(tmp_path, "--unlabelled-classes", "3", "--jobs", "1")
    assert hidden["grid"]["unlabelled_classes"] == 3
    drawn = {r["seed"]: tuple(r["unlabelled_classes"]) for r in hidden["runs"]}
    assert all(len(names) == 3 for names in drawn.values()) and drawn[0] != drawn[1]
    for r in hidden["runs"]:
        assert drawn[r["seed"]] == tuple(r["unlabelled_classes"])  # one draw per seed
        assert {"test_accuracy_unlabelled_classes", "test_h"} <= set(r)
        if r["method"] == "ce":  # nothing names a class it has no label for without a teacher
            assert r["classes_predicted"] <= 7 and r["test_accuracy_unlabelled_classes"] < 0.1
    rows = {(r["method"], r["control"]): r for r in hidden["unseen_summary"]}
    assert set(rows) == {("ce", ""), ("la", ""), ("la", "shuffled")}
    table = (tmp_path / "out" / "t.md").read_text()
    assert "Classes without labels" in table
    outlook = hidden["teachers"]["digits->fsdd"]["outlook"]  # checked before any training
    assert set(outlook["r"]) == {"b5 s0", "b5 s1"} and outlook["verdict"].startswith("do not")
    assert f"| digits->fsdd | {outlook['r_mean']:+.2f} |" in table
    # The same grid with every class labelled is another experiment: nothing is reused.
    assert _bench(tmp_path, "--resume", "--jobs", "1")["resumed_runs"] == 0

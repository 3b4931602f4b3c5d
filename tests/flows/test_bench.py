"""``cmkd bench`` end to end on a tiny grid: worker processes, the runs file, resume, cache."""

from __future__ import annotations

import copy
import json

import yaml

from cmkd_core.config import DistillParams, TeacherParams
from flows.bench import _same_settings
from flows.cli import main


def _bench(root, *extra: str) -> dict:
    argv = ["bench", "--root", str(root), "--pairs", "digits->fsdd", "--methods", "ce", "la"]
    argv += ["--budgets", "5", "--seeds", "2", "--jobs", "2", "--out", str(root / "out")]
    assert main([*argv, "--name", "t", *extra]) == 0
    return json.loads((root / "out" / "t.json").read_text())


def test_bench_runs_in_workers_then_resumes_without_training_again(
    tmp_path, fsdd_wheel, tiny_params
):
    params = tiny_params.model_dump(mode="json")
    params["data"]["fsdd_wheel"] = str(fsdd_wheel)  # outside tmp_path's data/, on purpose
    params["allow_paths_outside_data"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

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
    # runs everything in this process, in the same table order.
    afresh = _bench(tmp_path, "--jobs", "1")
    assert afresh["resumed_runs"] == 0
    assert [(r["seed"], r["method"], r["control"]) for r in afresh["runs"]] == keys
    assert len(runs_file.read_text().splitlines()) == 6


def test_runs_made_before_a_param_existed_count_as_made_with_its_default():
    now = {
        "distill": DistillParams().model_dump(mode="json", exclude={"threads"}),
        "teacher": TeacherParams().model_dump(mode="json", exclude={"threads"}),
    }
    older = copy.deepcopy(now)
    del older["distill"]["ssl"]["center"], older["distill"]["min_steps"]
    assert _same_settings(older, now)
    older["distill"]["ssl"]["temperature"] = 0.2
    assert not _same_settings(older, now)
    assert not _same_settings({"distill": {"no_such_key": 1}}, now)
    assert not _same_settings({}, now)


def test_a_pair_whose_optional_parts_are_missing_is_skipped_with_its_reason(
    tmp_path, monkeypatch, capsys, fsdd_wheel, tiny_params
):
    import cmkd_core.data.fashion as fashion

    monkeypatch.setattr(fashion, "FOLDER", tmp_path / "no-fashion-here")
    params = tiny_params.model_dump(mode="json")
    params["data"]["fsdd_wheel"] = str(fsdd_wheel)
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

"""The stage registry (flows/registry.py) is the one list of stages: ``dvc.yaml``, the stage
flows and ``cmkd stage`` agree with it, and a disagreement is found."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cmkd_app.parser import build_parser
from flows import registry, stages

ROOT = Path(__file__).resolve().parents[2]


def disagreements(spec: dict, stages_: tuple[registry.Stage, ...]) -> list[str]:
    """Where ``dvc.yaml`` (``spec``) and the registry differ, one line each."""
    found = []
    names = [stage.name for stage in stages_]
    if list(spec.get("stages", {})) != names:
        found.append(f"stages {list(spec.get('stages', {}))} != registry {names}")
    for stage in stages_:
        entry = spec.get("stages", {}).get(stage.name)
        if entry is None:
            continue
        if entry.get("cmd") != f"cmkd stage {stage.name}":
            found.append(f"{stage.name}: cmd {entry.get('cmd')!r}")
        if stage.task_file not in entry.get("deps", []):
            found.append(f"{stage.name}: {stage.task_file} not in deps")
        outs = [
            next(iter(out)) if isinstance(out, dict) else out
            for out in entry.get("outs", []) + entry.get("metrics", [])
        ]
        if sorted(outs) != sorted(stage.outs):
            found.append(f"{stage.name}: outs {sorted(outs)} != registry {sorted(stage.outs)}")
    return found


def test_dvc_yaml_agrees_with_the_registry():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert disagreements(spec, registry.STAGES) == []


@pytest.mark.parametrize("change", ["rename", "out", "cmd", "task"])
def test_a_dvc_yaml_that_disagrees_is_found(change):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    planted = copy.deepcopy(spec)
    entry = planted["stages"]["distill"]
    if change == "rename":
        planted["stages"] = {
            ("distil" if k == "distill" else k): v for k, v in planted["stages"].items()
        }
    elif change == "out":
        entry["outs"].append("data/distill-extra")
    elif change == "cmd":
        entry["cmd"] = "cmkd stage teacher"
    else:
        entry["deps"].remove("tasks/train.py")
    found = disagreements(planted, registry.STAGES)
    assert found and all(("distill" in line or "distil" in line) for line in found), found


def test_every_stage_has_its_flow_of_the_same_name_and_cmkd_stage_offers_each():
    assert list(stages.STAGES) == list(registry.NAMES)
    assert [flow.name for flow in stages.STAGES.values()] == list(registry.NAMES)
    parser = build_parser("cmkd")
    for name in registry.NAMES:
        assert parser.parse_args(["stage", name]).name == name
    with pytest.raises(SystemExit):
        parser.parse_args(["stage", "distil"])


def test_the_stage_modules_exist_and_come_once_each_in_pipeline_order():
    import importlib.util

    modules = registry.stage_modules()
    assert len(set(modules)) == len(modules)
    assert (
        modules.index("tasks.data") < modules.index("tasks.train") < modules.index("tasks.export")
    )
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module

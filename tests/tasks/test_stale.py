"""What a run says is stale: the changed stages and everything downstream of them."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.stages import STAGES
from tasks.dvc import with_downstream

ROOT = Path(__file__).resolve().parents[2]


def test_stages_downstream_of_a_changed_one_are_stale_too():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    # What a user saw: dvc status listed export, prepare and teacher; distill ran too.
    every = with_downstream(["export", "prepare", "teacher"], spec)
    assert every == list(STAGES) == list(spec["stages"])
    assert with_downstream(["evaluate"], spec) == ["evaluate", "export"]
    assert with_downstream(["export"], spec) == ["export"]
    assert with_downstream([], spec) == []

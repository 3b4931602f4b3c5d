"""The whole chain as one flow: DVC decides what is stale, stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_client

from flows.stages import STAGES
from tasks.dvc import reproduce_stage
from tasks.layout import Layout


def _api_url() -> str | None:
    """The Prefect API this flow reports to, so the stage flows DVC starts report there too
    (and do not each start a temporary server)."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


@flow(name="pipeline")
def pipeline(root: str = ".") -> dict:
    """Reproduce every stage of ``dvc.yaml`` in order; an unchanged stage is skipped by DVC.

    Returns the evaluation metrics and where the ONNX student is.
    """
    root_path = Path(root).resolve()
    api_url = _api_url()
    for stage in STAGES:
        reproduce_stage(stage, root_path, api_url)
    layout = Layout(root_path)
    return {"metrics": json.loads(layout.metrics.read_text()), "onnx": str(layout.onnx)}

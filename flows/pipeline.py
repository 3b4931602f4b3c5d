"""The whole chain as one flow: DVC decides what is stale, stage by stage.

The flow is what ``cmkd run`` and the scheduled deployment (``prefect.yaml``) run:

1. the partial outputs of a stage whose last run did not finish (killed, interrupted) are
   removed (its resume checkpoints stay); then ``dvc pull`` from the default remote (a local
   folder unless configured otherwise), so a fresh machine starts from earlier artifacts;
2. ``dvc status``: when nothing is stale, the run stops here, having changed nothing;
3. ``dvc repro --single-item`` for each stage in order (DVC skips the unchanged ones); the
   stage commands DVC starts have their flows run here, in this process, as subflows
   (tasks/stage_host.py), so torch and Prefect are imported once per run, not per stage;
4. ``dvc push`` of the new artifacts, unless the default remote is a folder on the disk of
   DVC's cache (the default ``.cmkd/dvc-remote``): a second copy of every artifact on the same
   disk buys nothing at scale (``cmkd run --push`` or ``cmkd push`` makes it anyway);
5. a run record, ``.cmkd/runs/<time>-<flow run name>.json``: what was stale, what ran, what
   DVC restored from its run cache, which training runs resumed from a checkpoint and at
   which epoch (tasks/resumed.py; the stage's line says it too), whether it pushed, the
   ``dvc.lock`` digest (``dvc.lock`` itself is DVC's record of how each output was made), and
   the process's wall seconds split into training, parity runs and overhead
   (tasks/timing.py), also in the run's log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.runtime import flow_run

from cmkd_core.config import load_params
from cmkd_core.data import write_text_atomic
from flows.stages import STAGES, run_stage
from tasks.dvc import clear_unfinished, pull, push, reproduce_stage, stale_stages
from tasks.layout import Layout
from tasks.resumed import clear_note, read_note
from tasks.stage_host import hosting
from tasks.timing import report


def _api_url() -> str | None:
    """The Prefect API this flow reports to, so the stage flows DVC starts report there too
    (and do not each start a temporary server)."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


def headline(stage: str, root: Path) -> str:
    """The number that says how a stage went, read from its outputs (``""`` if none)."""
    layout = Layout(root)

    def read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    if stage == "validate":
        report = read(layout.validation_report)
        sizes = [sum(report[r]["samples"].values()) for r in ("teacher", "student") if r in report]
        return f"{sizes[0]} teacher and {sizes[1]} student samples" if len(sizes) == 2 else ""
    if stage == "teacher":
        acc = read(layout.teacher_metrics).get("test_accuracy")
        return f"teacher test accuracy {acc:.4f}" if acc is not None else ""
    if stage == "distill":
        selection = read(layout.distill_dir / "selection.json")
        if selection:
            chosen = selection["chosen"]
            return f"auto chose {chosen} (val {selection['candidates'][chosen]:.4f})"
        return ""
    if stage == "evaluate":
        metrics = read(layout.metrics)
        if metrics:
            return (
                f"student test accuracy {metrics['student']['test_accuracy']:.4f}, "
                f"CE-only {metrics['ce_only']['test_accuracy']:.4f}"
            )
        return ""
    if stage == "export":
        card = read(layout.model_card)
        diff = card.get("metrics", {}).get("onnx_max_abs_logit_diff")
        return (
            f"{layout.onnx.name}, max |logit diff| vs torch {diff:.1e}" if diff is not None else ""
        )
    return ""


def resumed_text(note: dict[str, dict[str, int]]) -> str:
    """Which training runs of a stage resumed from a checkpoint (``note``, tasks/resumed.py),
    for the stage's line: ``resumed ce from epoch 7``, or ``resumed ce (finished before), joint
    from epoch 3``; ``""`` when none did."""
    parts = [
        f"{run} (finished before)"
        if entry["from_epoch"] > entry["epochs"]
        else f"{run} from epoch {entry['from_epoch']}"
        for run, entry in note.items()
    ]
    return f"resumed {', '.join(parts)}" if parts else ""


def stage_line(stage: str, outcome: str, seconds: float, root: Path) -> str:
    """A stage's line in ``cmkd run``'s output: name, outcome, seconds, its headline and, for a
    stage that ran, which of its training runs resumed from a checkpoint."""
    said = [headline(stage, root)]
    if outcome == "ran":
        said.append(resumed_text(read_note(root, stage)))
    shown = {"skipped": "up to date"}.get(outcome, outcome)
    line = f"{stage:<9} {shown:<10} {seconds:6.1f} s  {'; '.join(s for s in said if s)}"
    return line.rstrip()


def _record(root: Path, record: dict) -> Path:
    """Write the run record under ``root/.cmkd/runs`` (atomically) and return its path."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = root / ".cmkd" / "runs" / f"{stamp}-{record['flow_run']}.json"
    write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


@flow(name="pipeline")
def pipeline(root: str = ".", push_to_same_disk: bool = False) -> dict:
    """Pull, reproduce every stale stage of ``dvc.yaml`` in order, push, record the run.

    Returns the evaluation metrics, where the ONNX student is, which stages were stale and
    which ran (``nothing_to_do`` when none was), and the run record's path. The push is
    skipped for a remote on the disk of DVC's cache unless ``push_to_same_disk``. Bad params
    (``ParamsError``: an unknown method, a typo in a key) stop it before any stage runs.
    """
    root_path = Path(root).resolve()
    load_params(Layout(root_path).params)
    logger = get_run_logger()
    run = {"name": str(flow_run.name or "local"), "id": str(flow_run.id or "")}
    record: dict = {"flow_run": run["name"], "flow_run_id": run["id"]}
    record["cleared"] = clear_unfinished(root_path)
    record["pulled"] = pull(root_path)
    stale = stale_stages(root_path)
    record["stale"], record["ran"], record["restored"] = stale, [], []
    if stale:
        api_url = _api_url()
        with hosting(root_path, run_stage) as host:
            for stage in STAGES:
                start = time.perf_counter()
                clear_note(root_path, stage)  # what a run of the stage resumes: this run's
                outcome = reproduce_stage(stage, root_path, api_url, run, host)
                seconds = time.perf_counter() - start
                if outcome != "skipped":
                    record[outcome].append(stage)
                if outcome == "ran" and (note := read_note(root_path, stage)):
                    record.setdefault("resumed", {})[stage] = note
                record.setdefault("seconds", {})[stage] = round(seconds, 2)
                line = stage_line(stage, outcome, seconds, root_path)
                logger.info("%s", line, extra={"cmkd_line": True})
        record["pushed"] = push(root_path, force=push_to_same_disk)
    else:
        logger.info("nothing to do: every stage is up to date")
        record["pushed"] = False
    record["timing"] = timing = report()
    logger.info(
        "this run so far: %.1f s wall, %.1f s training and %.1f s parity runs, %.1f s overhead",
        *(timing[k] for k in ("wall", "training", "parity", "overhead")),
    )
    lock = root_path / "dvc.lock"
    record["dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    record["nothing_to_do"] = not stale
    layout = Layout(root_path)
    result = {
        "metrics": json.loads(layout.metrics.read_text()),
        "onnx": str(layout.onnx),
        **{k: record[k] for k in ("stale", "ran", "restored", "nothing_to_do")},
    }
    result["record"] = str(_record(root_path, record))
    return result

"""One Prefect flow per DVC stage (flows/registry.py lists them); ``dvc.yaml`` runs them through
``cmkd stage NAME``.

Each flow imports its tasks when it runs, so a stage process loads only what that stage
needs (``prepare`` and ``validate`` no torch, ONNX or matplotlib): six stage processes start
several seconds faster in all.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cmkd_core.config import load_params
from flows import registry
from tasks.layout import Layout


@flow(name="prepare")
def prepare(root: str = ".") -> dict:
    """Write the embedded default pair, or copy the imported one, into ``data/prepared``
    (params: ``data``); with ``teacher.source: text`` the teacher dataset is the texts
    embedded instead (``teacher.texts``, ``teacher.text_model``)."""
    from tasks.data import copy_imported_pair, materialise_default_pair, texts_teacher

    layout = Layout(Path(root))
    params = load_params(layout.params)
    text = params.teacher.source == "text"
    if params.data.source == "import":
        roles = ("student",) if text else ("teacher", "student")
        counts = copy_imported_pair(layout, params.data, roles)
    else:
        counts = materialise_default_pair(layout, params.data)
    if text:
        counts.update(texts_teacher(layout, params.teacher, params.data))
    return counts


@flow(name="validate")
def validate(root: str = ".") -> dict:
    """Check both datasets against the contract; stop the run on any violation."""
    from tasks.data import validate_pair

    return validate_pair(Layout(Path(root)))


@flow(name="teacher")
def teacher(root: str = ".") -> dict:
    """Train the teacher on its modality and extract the bank (params: ``teacher``)."""
    from tasks.train import clear_checkpoints, train_teacher

    layout = Layout(Path(root))
    result = train_teacher(layout, load_params(layout.params).teacher)
    clear_checkpoints(layout, "teacher")
    return result


@flow(name="distill")
def distill(root: str = ".") -> dict:
    """Train the distilled student and the CE-only baseline (params: ``distill``); with
    ``method: auto``, every candidate, then keep the best on validation."""
    from tasks.train import (
        clear_checkpoints,
        distill_student,
        outlook,
        plan_candidates,
        select_student,
    )

    layout = Layout(Path(root))
    params = load_params(layout.params).distill
    outlook(layout, params)
    result = {m: distill_student(layout, params, m) for m in plan_candidates(layout, params)}
    if params.method == "auto":
        result["auto"] = select_student(layout, result)
    clear_checkpoints(layout, "distill")
    return result


@flow(name="evaluate")
def evaluate(root: str = ".") -> dict:
    """Test metrics at the best-validation epoch for both students, and plots."""
    from tasks.evaluate import evaluate_students

    layout = Layout(Path(root))
    return evaluate_students(layout, load_params(layout.params).distill.method)


@flow(name="export")
def export(root: str = ".") -> dict:
    """ONNX export with the parity gate, and the model card (params: ``export``)."""
    from tasks.export import export_student

    layout = Layout(Path(root))
    return export_student(layout, load_params(layout.params))


STAGES = {stage.name: globals()[stage.name] for stage in registry.STAGES}
"""Each stage's flow, by name, in the registry's order (flows/registry.py)."""


def run_stage(name: str, root: Path, traceback: bool = True) -> int:
    """Run stage ``name``'s flow for the project at ``root`` in this process, as ``cmkd stage``
    does: returns 0, or 2 for bad data, params or a bad bank, 1 for anything else; a failure's
    message is printed to stderr (after its traceback if ``traceback``) and left in
    ``.cmkd/last-error.json`` for the pipeline flow that ran the stage through DVC. Until the
    flow succeeds, ``.cmkd/unfinished/NAME`` says that the stage's outputs may be partial."""
    import json
    import os
    import sys

    from cmkd_core.bank import BankError
    from cmkd_core.config import ParamsError
    from cmkd_core.data import DataContractError, write_text_atomic

    marker = Layout(Path(root)).unfinished(name)
    write_text_atomic(marker, f"{os.getpid()}\n")
    try:
        STAGES[name](root=str(root))
        marker.unlink(missing_ok=True)
        return 0
    except (DataContractError, ParamsError, BankError) as exc:
        message, code = str(exc), 2
    except Exception as exc:
        if traceback:
            import traceback as tb

            tb.print_exc()
        message, code = f"{type(exc).__name__}: {exc}", 1
    print(f"cmkd: {message}", file=sys.stderr)
    error = {"stage": name, "exit": code, "message": message}
    write_text_atomic(Layout(Path(root)).last_error, json.dumps(error) + "\n")
    return code

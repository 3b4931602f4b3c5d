"""Which training runs of a stage resumed from a checkpoint, and at which epoch.

The teacher and distill stages note it in ``.cmkd/resumed/STAGE.json`` (``{run: {"from_epoch":
e, "epochs": n}}``, one entry per run that found a checkpoint of its settings) as each run
starts; ``cmkd run`` clears the note before it reproduces the stage and reads it after, for the
stage's line. Not a DVC output, and not in any: a resumed stage's outputs stay byte-identical to
those of a run never interrupted. No torch here: the pipeline's flow reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from cmkd_core.data import write_text_atomic


def note_path(root: Path, stage: str) -> Path:
    """Where ``stage``'s note is kept in the project at ``root``."""
    return Path(root) / ".cmkd" / "resumed" / f"{stage}.json"


def read_note(root: Path, stage: str) -> dict[str, dict[str, int]]:
    """``stage``'s note: ``{run: {"from_epoch": e, "epochs": n}}`` in the order the runs
    started (``{}`` without one)."""
    try:
        found = json.loads(note_path(root, stage).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def add_to_note(root: Path, stage: str, run: str, from_epoch: int, epochs: int) -> None:
    """Note that ``stage``'s training run ``run`` (``ce``, ``teacher``) resumes at epoch
    ``from_epoch`` of ``epochs`` (``from_epoch > epochs``: it had finished)."""
    note = read_note(root, stage)
    note[run] = {"from_epoch": int(from_epoch), "epochs": int(epochs)}
    write_text_atomic(note_path(root, stage), json.dumps(note, indent=1) + "\n")


def clear_note(root: Path, stage: str) -> None:
    """Forget ``stage``'s note (before the stage runs again)."""
    note_path(root, stage).unlink(missing_ok=True)

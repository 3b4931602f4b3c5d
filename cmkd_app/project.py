"""Which ``cmkd`` commands work on a project, and what they say outside one.

A cmkd project is a folder with a ``dvc.yaml`` (a clone of this repository). ``run``,
``summary``, ``server``, ``deploy`` and ``worker`` need one; ``stage``, ``bench``, ``seeds`` and
``bank inspect`` (without a bank's path) read only ``params.yaml`` and the data, so a folder
with a ``params.yaml`` does for them too. Outside a project these commands stop at once, before
Prefect, DVC or torch is imported and before any server starts, with one line and exit status
2. ``predict``, ``serve``, ``import`` and ``import-layout`` read only their arguments and work
anywhere.

Importing ``tasks`` (which ``flows`` does) creates ``.cmkd/prefect`` in the working directory,
Prefect's default home; a command that stops, or one that never uses Prefect, removes it again
when it is empty and the working directory is not a project (:func:`tidy_state_folder`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROJECT = ("dvc.yaml",)
"""Files of which one marks a folder as a project, for the commands that run the pipeline."""
PARAMS = ("dvc.yaml", "params.yaml")
"""The same for the commands that read only the parameters and the data."""
NEEDS = {
    "run": PROJECT,
    "push": PROJECT,
    "summary": PROJECT,
    "server": PROJECT,
    "deploy": PROJECT,
    "worker": PROJECT,
    "stage": PARAMS,
    "bench": PARAMS,
    "seeds": PARAMS,
    "bank": PARAMS,
}


def missing_project(command: str, root: Path, path_given: bool = False) -> str | None:
    """Why ``command`` cannot run with project root ``root`` (one line), or ``None`` when it
    can: ``root`` holds one of the files the command needs, or the command needs none
    (``path_given``: ``bank inspect`` was given the bank's path)."""
    needed = NEEDS.get(command)
    if needed is None or path_given or any((root / name).is_file() for name in needed):
        return None
    return f"no {' or '.join(needed)} in {root.resolve()}: cd into a cmkd project or pass --root"


def tidy_state_folder(cwd: Path | None = None) -> None:
    """Remove ``.cmkd/prefect`` and ``.cmkd`` from ``cwd`` (default: the working directory) if
    importing ``tasks`` left them there empty and ``cwd`` is not a project; anything with a
    file in it stays."""
    cwd = Path.cwd() if cwd is None else cwd
    home = cwd / ".cmkd" / "prefect"
    if any((cwd / name).is_file() for name in PARAMS):
        return
    if Path(os.environ.get("PREFECT_HOME", "")).resolve() != home.resolve():
        return  # a home the user chose: not ours to remove
    for folder in (home, home.parent):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            return


def refuse_outside_project(args: argparse.Namespace) -> int | None:
    """For ``cmkd``'s parsed ``args``: 2, after printing why, when the command needs a project
    and ``--root`` is not one; else ``None`` (the command goes on)."""
    path_given = bool(getattr(args, "path", None))
    problem = missing_project(args.command, Path(getattr(args, "root", ".")), path_given)
    if problem is None:
        if args.command not in NEEDS or path_given:  # commands that never use Prefect
            tidy_state_folder()
        return None
    tidy_state_folder()
    print(f"cmkd: {problem}", file=sys.stderr)
    return 2

"""``cmkd stage NAME``: what ``dvc.yaml`` runs for each stage.

Under ``cmkd run`` the pipeline's process runs the stage (tasks/stage_host.py); under a bare
``dvc repro`` the project's stage worker does, if one is up (cmkd_app/stage_worker.py);
otherwise this process runs the stage's flow (flows/stages.py) itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

from cmkd_app.prefect_api import run_flow
from flows.registry import stage_modules
from tasks.stage_host import VARIABLE, read_line

STAGE_MODULES = ("dvc.repo", *stage_modules())
"""What the pipeline imports, in the order it needs it: imported while the local server
starts (``ensure_server``'s ``meanwhile``), not after it, and by a stage worker before it
serves. ``dvc.repo``: status, pull and push (tasks/dvc.py)."""


def delegate_to_host(stage: str, root: str) -> int | None:
    """Have the pipeline's stage host run ``stage`` for ``root`` and return its exit status;
    ``None`` when there is no host (no ``CMKD_STAGE_SOCKET``, or it does not answer) or it
    declines: then the command runs the stage itself."""
    path = os.environ.get(VARIABLE)
    if not path:
        return None
    env = {k: v for k, v in os.environ.items() if k.startswith("CMKD_RUN_")}
    request = {"stage": stage, "root": str(Path(root).resolve()), "env": env}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            reply = read_line(conn)
    except OSError:
        return None
    if not reply:  # the pipeline's process went away mid-stage
        print(f"cmkd: the pipeline process running stage {stage!r} went away", flush=True)
        return 1
    code = json.loads(reply).get("exit")
    return None if code is None else int(code)


def delegated(args: argparse.Namespace) -> int | None:
    """The stage's exit status if the pipeline's host or the project's stage worker ran it;
    ``None`` if this process must."""
    try:
        code = delegate_to_host(args.name, args.root)
    except KeyboardInterrupt:  # Ctrl-C reached the pipeline too: it says so
        return 130
    if code is None:  # a bare `dvc repro`: the project's stage worker, if there is one
        from cmkd_app import worker_client

        code = worker_client.delegate(args.name, args.root, args.argv)
    return code


def run_here(args: argparse.Namespace) -> int:
    """Run the stage's flow in this process against the project's Prefect API."""
    from cmkd_app.console import quiet_tracebacks
    from flows.stages import run_stage

    if not args.verbose:
        quiet_tracebacks()
    return run_flow(run_stage, name=args.name, root=Path(args.root), traceback=args.verbose)

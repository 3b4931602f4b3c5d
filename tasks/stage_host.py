"""Stage commands that DVC starts, run inside the pipeline's own process.

``dvc repro`` runs each stage as ``cmkd stage NAME`` in a new process, which then imports
torch, Prefect and ONNX and registers a flow run before doing a few seconds of work. Under
``cmkd run`` (the ``pipeline`` flow) that process only asks: it finds ``CMKD_STAGE_SOCKET`` in
its environment, sends the stage's name and directory to the pipeline's :class:`StageHost`
over that Unix socket, waits, and exits with the status the stage had there. The stage's flow
runs in the pipeline's process (a subflow of its ``dvc-repro`` task), which has everything
imported once and talks to the same Prefect API. DVC sees an ordinary command: it hashes the
dependencies, runs it, records the outputs in ``dvc.lock`` and its run cache, as before.

A ``cmkd stage`` without the variable (a bare ``dvc repro``), or one whose directory is not
the pipeline's, runs the stage itself. The command's side is cmkd_app/stage.py; the host stays
here, below the command layer, because the pipeline flow hosts its stages wherever it runs,
under ``cmkd run`` or a Prefect deployment's worker alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

VARIABLE = "CMKD_STAGE_SOCKET"
StageRunner = Callable[[str, Path], int]
"""``runner(stage, root)``: run one stage's flow for the project at ``root``; its exit status."""


class StageHost:
    """A listening Unix socket in a private temporary folder; :meth:`serve` answers the stage
    commands that connect to it by calling ``runner`` in this process."""

    def __init__(self, root: Path, runner: StageRunner):
        self.root = Path(root).resolve()
        self.runner = runner
        self.folder = tempfile.mkdtemp(prefix="cmkd-stages-")  # mode 0700: this user only
        self.path = os.path.join(self.folder, "stages.sock")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.bind(self.path)
        self.socket.listen(4)
        self.ran: list[str] = []

    def environment(self) -> dict[str, str]:
        """What a stage command's environment needs to find this host."""
        return {VARIABLE: self.path}

    def answer(self) -> None:
        """Accept one stage command and run its stage (call when the socket is readable)."""
        conn, _ = self.socket.accept()
        with conn:
            request = json.loads(read_line(conn) or "{}")
            stage, root = request.get("stage"), Path(request.get("root", "")).resolve()
            if not stage or root != self.root:
                conn.sendall(b'{"exit": null}\n')  # not ours: the command runs it itself
                return
            saved = {key: os.environ.get(key) for key in request.get("env", {})}
            os.environ.update(request.get("env", {}))
            try:  # in the stage's own directory, as DVC would have run it: paths read the same
                with contextlib.chdir(root):
                    code = self.runner(stage, Path("."))
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            self.ran.append(stage)
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")

    def register(self, selector: selectors.BaseSelector) -> None:
        """Watch the socket in ``selector`` (its data: :meth:`answer`)."""
        selector.register(self.socket, selectors.EVENT_READ, self.answer)

    def close(self) -> None:
        self.socket.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def hosting(root: Path, runner: StageRunner) -> Iterator[StageHost]:
    """A :class:`StageHost` for the duration of the block."""
    host = StageHost(root, runner)
    try:
        yield host
    finally:
        host.close()


def read_line(conn: socket.socket, data: bytes = b"") -> str:
    """One newline-ended message from ``conn`` (``data``: what was already received of it);
    what came before the peer closed, if it closed first."""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()

"""The stage command's side of the stage worker (cmkd_app/stage_worker.py): whether a worker
is used here, how a command and a worker recognise each other (the project, the interpreter,
the source files and the settings), where the worker listens, and handing a stage to it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.stage_host import read_line

_SETTINGS = ("PREFECT_", "CMKD_", "PYTHON", "VIRTUAL_ENV", "OMP_", "MKL_", "CUDA_")
_PER_RUN = ("CMKD_RUN_", "CMKD_STAGE_")
_SOURCE = Path(__file__).resolve().parents[1]
# The worker imports cmkd from where this command did, whatever its directory holds.
_START = (
    "import sys; sys.path.insert(0, sys.argv[1]); from cmkd_app.stage_worker import main; main()"
)


def enabled() -> bool:
    """Whether stage commands use a worker here: on Linux, unless ``CMKD_STAGE_WORKER=0``."""
    return sys.platform == "linux" and os.environ.get("CMKD_STAGE_WORKER", "1") != "0"


def fingerprint(root: Path) -> str:
    """What a worker must share with a command to run its stage: the project directory, the
    interpreter, every source file's size and time, and the settings in the environment."""
    digest = hashlib.sha256(f"{Path(root).resolve()}\n{sys.executable}\n".encode())
    for package in ("cmkd_core", "flows", "tasks", "cmkd_app"):
        for path in sorted((_SOURCE / package).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    for key in sorted(os.environ):
        if key.startswith(_SETTINGS) and not key.startswith(_PER_RUN):
            digest.update(f"{key}={os.environ[key]}\n".encode())
    return digest.hexdigest()


def socket_path(root: Path) -> Path:
    """The worker's socket for project ``root``, in a folder of this user's only (a Unix
    socket's path must stay short, so not under the project)."""
    folder = Path(tempfile.gettempdir()) / f"cmkd-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return folder / f"stages-{key}.sock"


def _starting(root: Path) -> bool:
    """Whether a worker holds ``root``'s lock (it is importing, or serves)."""
    with open(f"{socket_path(root)}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def _spawn(root: Path) -> None:
    """Start a worker for ``root`` in the background, its output in ``.cmkd/stage-worker.log``."""
    log = Path(root) / ".cmkd" / "stage-worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        subprocess.Popen(
            [sys.executable, "-P", "-c", _START, str(_SOURCE), str(Path(root).resolve())],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command, untouched by its Ctrl-C
        )


def delegate(stage: str, root: str, argv: list[str]) -> int | None:
    """From a ``cmkd stage`` command (``argv`` its arguments): have the project's worker run
    the stage with this process's output and return its status; ``None`` when there is no
    worker (one is started for the next command) or it declines: then run the stage here."""
    if not enabled():
        return None
    project = Path(root).resolve()
    request = {"root": str(project), "fingerprint": fingerprint(project), "argv": argv}
    request["cwd"] = os.getcwd()
    request["env"] = dict(os.environ)
    conn = _connect(project)
    if conn is None:
        _spawn(project)
        return None
    with conn:
        try:
            message = json.dumps(request).encode() + b"\n"
            socket.send_fds(conn, [message], [sys.stdout.fileno(), sys.stderr.fileno()])
            reply = read_line(conn)
        except OSError:
            reply = ""
    code = json.loads(reply).get("exit") if reply else None
    if code is None:  # declined (the worker then exits) or gone: a fresh one for the next
        _spawn(project)
        return None
    return int(code)


def _connect(root: Path, wait: float = 30.0) -> socket.socket | None:
    """A connection to ``root``'s worker; one that is still importing is waited for (up to
    ``wait`` seconds: less than this command would take to import the same); ``None`` if
    there is none."""
    deadline = time.monotonic() + wait
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(socket_path(root)))
            return conn
        except OSError:
            conn.close()
        if not _starting(root) or time.monotonic() > deadline:
            return None
        time.sleep(0.05)

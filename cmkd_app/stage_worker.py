"""A stage worker for a bare ``dvc repro``: stage commands that start in a fraction of a second.

Without ``cmkd run`` around it (tasks/stage_host.py), ``dvc repro`` starts each stage as a new
``cmkd stage NAME`` process that imports torch, Prefect, pandas and ONNX (3-4 s on 2 cores)
before a few seconds of work. The first such command of a project starts this worker in the
background and runs its own stage as before; the worker imports what the stages use, then
waits. Each later stage command connects to it over a Unix socket and hands over its standard
output and error; the worker forks a child, which already has everything imported, and the
child runs the stage exactly as ``cmkd stage`` would, writing to the command's own output.
The command exits with the child's status; if the command dies (killed, Ctrl-C), the worker
kills the child, so the stage stops with it as it would have in its own process. DVC sees an
ordinary command, as before.

The worker serves one project directory, one interpreter and one version of the code: a
command whose source files, interpreter or ``PREFECT_*`` / ``CMKD_*`` settings differ from the
worker's is declined (it runs its stage itself) and the worker exits, to be replaced. It exits
after ``CMKD_STAGE_WORKER_IDLE_SECONDS`` (default 300) without a request;
``CMKD_STAGE_WORKER=0`` turns it off. Linux only (it forks); elsewhere commands run as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from cmkd_app.process import exit_now
from cmkd_app.worker_client import fingerprint, socket_path
from tasks.stage_host import read_line

IDLE_SECONDS = 300.0


def _child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the command and run its stage; returns its status."""
    try:
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["CMKD_STAGE_WORKER"] = "0"  # this process runs the stage: no delegating
        os.chdir(request["cwd"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from cmkd_app.cli import main

        return main(request["argv"])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1


def _run(conn: socket.socket, request: dict, fds: list[int]) -> int:
    """Fork a child for ``request``; wait for it, killing it if the command goes away."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        exit_now(_child(request, fds))  # see cmkd_app/process.py
    for fd in fds:
        os.close(fd)
    with selectors.DefaultSelector() as selector:
        selector.register(conn, selectors.EVENT_READ)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if selector.select(timeout=0.05) and not conn.recv(1):  # the command died
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return -signal.SIGKILL


def serve(root: Path, idle: float) -> int:
    """The worker's life: import, listen, run stages one at a time, exit when idle."""
    started = time.monotonic()
    root = Path(root).resolve()
    path = socket_path(root)
    with open(f"{path}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # another worker serves this project
        from cmkd_app.stage import STAGE_MODULES

        for module in ("cmkd_app.cli", "cmkd_app.commands", "flows.stages", *STAGE_MODULES):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        if threading.active_count() > 1:  # forking with Python threads running is not safe
            print("stage worker: threads running after the imports: not serving", flush=True)
            return 0
        mine = fingerprint(root)
        path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            server.listen(4)
            ready = time.monotonic() - started
            print(f"stage worker {os.getpid()} for {root} at {path} ({ready:.1f} s)", flush=True)
            try:
                while True:
                    with selectors.DefaultSelector() as selector:
                        selector.register(server, selectors.EVENT_READ)
                        if not selector.select(timeout=idle):
                            print("stage worker: idle, exiting", flush=True)
                            return 0
                    conn, _ = server.accept()
                    with conn:
                        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
                        request = json.loads(read_line(conn, message) or "{}")
                        ours = request.get("root") == str(root) and len(fds) == 2
                        if not ours or request.get("fingerprint") != mine:
                            for fd in fds:
                                os.close(fd)
                            conn.sendall(b'{"exit": null}\n')
                            print("stage worker: code or settings changed, exiting", flush=True)
                            return 0
                        code = _run(conn, request, fds)
                        print(f"stage worker: {request['argv']} exited {code}", flush=True)
                        with contextlib.suppress(OSError):
                            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
            finally:
                path.unlink(missing_ok=True)


def idle_seconds() -> float:
    """How long a worker waits for the next stage: ``CMKD_STAGE_WORKER_IDLE_SECONDS`` or 300."""
    return float(os.environ.get("CMKD_STAGE_WORKER_IDLE_SECONDS") or IDLE_SECONDS)


def main() -> None:
    """``python -P -c _START SOURCE ROOT`` (cmkd_app/worker_client.py starts it): serve ``ROOT``."""
    sys.exit(serve(Path(sys.argv[-1]), idle_seconds()))

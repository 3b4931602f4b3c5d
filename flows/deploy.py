"""The ``pipeline`` flow as a scheduled Prefect deployment on a local server.

Two ways to run it every night (02:00 UTC):

1. A server, a ``process`` work pool, the ``nightly`` deployment of ``prefect.yaml`` and a
   worker that runs it in this checkout. From the project directory::

       export PREFECT_HOME=$PWD/.cmkd/prefect PREFECT_API_URL=http://127.0.0.1:4200/api
       export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
       mkdir -p $PREFECT_HOME
       prefect server start --host 127.0.0.1 --port 4200 &      # SQLite in $PREFECT_HOME
       prefect work-pool create cmkd --type process             # once
       prefect --no-prompt deploy --all                         # after each prefect.yaml edit
       CMKD_ROOT=$PWD prefect worker start --pool cmkd &
       prefect deployment run pipeline/nightly                  # a run now, besides the cron
       prefect flow-run ls --flow-name pipeline

   The functions below do the same from Python (the end-to-end test uses them).

2. One process, no work pool: ``python -m flows.deploy serve`` (``serve()``) registers the
   same schedule and runs the flow runs itself while it lives.

The server keeps its state in SQLite under ``PREFECT_HOME`` (``prefect.db``). For PostgreSQL,
start the server with ``PREFECT_API_DATABASE_CONNECTION_URL`` set, for example
``postgresql+asyncpg://prefect:PASSWORD@db-host:5432/prefect`` (the ``asyncpg`` driver comes
with Prefect; the database must exist); ``server_env`` keeps a URL the environment already
has. Only the server reads it; workers and clients need ``PREFECT_API_URL`` alone.

Children are started in their own process group (``start_new_session``) and stopped with
SIGTERM, then SIGKILL, on the whole group: a worker started in the background of a shell
ignores SIGINT. Flow runs started by a worker have sessions of their own; ``stop`` ends them
too (found with ``psutil``, which DVC depends on).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

import tasks  # noqa: F401  (Prefect's offline defaults, before Prefect is imported)

POOL = "cmkd"
DEPLOYMENT = "pipeline/nightly"
CRON = "0 2 * * *"
HOST = "127.0.0.1"
_DATABASE_URL_KEYS = (
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
)


def api_url(port: int) -> str:
    """The API address of a local server on ``port``."""
    return f"http://{HOST}:{port}/api"


def dashboard_url(port: int) -> str:
    """The address of the Prefect dashboard (UI) of a local server on ``port``."""
    return f"http://{HOST}:{port}"


def server_env(home: Path, port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a local server on 127.0.0.1:``port`` and for everything that talks
    to it (CLI, worker, flow runs): ``PREFECT_HOME`` = ``home``, SQLite in it unless a database
    URL is already set, analytics off, and this interpreter's ``bin`` first on ``PATH``."""
    env = dict(os.environ if base is None else base)
    home = Path(home).resolve()
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api_url(port),
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    if not any(env.get(key) for key in _DATABASE_URL_KEYS):
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    return env


def prefect_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _spawn(command: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """``command`` in a process group of its own, output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def healthy(url: str) -> bool:
    """Whether the server at ``url`` (its API address) answers ``/health``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_server(
    home: Path, port: int, *, ui: bool = False, timeout: float = 120.0, env: Mapping | None = None
) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:``port`` with its state in ``home``; returns once
    ``/api/health`` answers (output in ``home/server.log``). Raises ``RuntimeError`` if the
    server exits or does not answer within ``timeout`` seconds (it is stopped then)."""
    env = server_env(home, port) if env is None else env
    ui_flag = "--ui" if ui else "--no-ui"
    command = prefect_command(
        "server", "start", "--host", HOST, "--port", str(port), "--analytics-off", ui_flag
    )
    log = Path(home) / "server.log"
    proc = _spawn(command, env, Path(home), log)
    deadline = time.monotonic() + timeout
    while not healthy(api_url(port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"Prefect server did not start; {log}:\n{log_tail(log)}")
        time.sleep(0.25)
    return proc


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> list[int]:
    """Stop a child started here and everything under it: SIGTERM to its process group and to
    its descendants in other sessions (a worker's flow runs), then SIGKILL to what is left after
    ``timeout`` seconds. Returns the ids of the processes it stopped; raises ``RuntimeError``
    if one survives SIGKILL."""
    import psutil

    pgid = proc.pid
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stopped = sorted({proc.pid, *(p.pid for p in descendants), *_group(pgid)})
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.send_signal(sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
            if proc.returncode is not None and not _alive(pgid, descendants):
                return stopped
    raise RuntimeError(f"processes left after SIGKILL: {_alive(pgid, descendants)}")


def _group(pgid: int) -> list[int]:
    """Ids of the live (not zombie) processes in process group ``pgid``."""
    import psutil

    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
    return found


def _alive(pgid: int, descendants: list[Any]) -> list[int]:
    """Ids of what is still running of a stopped child: its group and its descendants."""
    import psutil

    left = set(_group(pgid))
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                left.add(child.pid)
    return sorted(left)


@contextlib.contextmanager
def api_client(url: str | None) -> Iterator[Any]:
    """A synchronous Prefect client for ``url`` (default: the configured ``PREFECT_API_URL``)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: url} if url else {}
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        yield client


def ensure_pool(name: str = POOL, *, url: str | None = None) -> bool:
    """Create the ``process`` work pool ``name`` unless it exists; True if it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with api_client(url) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        pool = WorkPoolCreate(
            name=name,
            type=ProcessWorker.type,
            base_job_template=ProcessWorker.get_default_base_job_template(),
        )
        try:
            client.create_work_pool(pool)
        except ObjectAlreadyExists:
            return False
        return True


def deploy(root: Path, *, env: Mapping[str, str] | None = None, timeout: float = 300.0) -> str:
    """``prefect --no-prompt deploy --all`` in ``root`` (every deployment of its
    ``prefect.yaml``); returns the command's output, raises ``RuntimeError`` if it fails."""
    done = subprocess.run(
        prefect_command("--no-prompt", "deploy", "--all"),
        cwd=root,
        env=dict(os.environ if env is None else env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"prefect deploy failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def start_worker(
    pool: str = POOL,
    *,
    root: Path = Path("."),
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    poll_seconds: float | None = None,
) -> subprocess.Popen:
    """``prefect worker start --pool POOL`` for the checkout ``root`` (``CMKD_ROOT``, which the
    pull step of ``prefect.yaml`` changes into); ``poll_seconds`` overrides how often it asks
    the server for work (Prefect's default: 10 s). Output goes to ``log``
    (default: ``root/.cmkd/worker.log``)."""
    root = Path(root).resolve()
    worker_env = dict(os.environ if env is None else env)
    worker_env["CMKD_ROOT"] = str(root)
    if poll_seconds is not None:
        worker_env["PREFECT_WORKER_QUERY_SECONDS"] = str(poll_seconds)
    log = root / ".cmkd" / "worker.log" if log is None else log
    command = prefect_command("worker", "start", "--pool", pool, "--type", "process")
    return _spawn(command, worker_env, root, log)


def trigger(
    deployment: str = DEPLOYMENT,
    parameters: dict[str, Any] | None = None,
    *,
    url: str | None = None,
) -> str:
    """Create a flow run of ``deployment`` ("flow/deployment") now; returns its id."""
    with api_client(url) as client:
        found = client.read_deployment_by_name(deployment)
        run = client.create_flow_run_from_deployment(found.id, parameters=parameters or {})
        return str(run.id)


def wait(
    flow_run_id: str, timeout: float = 600.0, *, url: str | None = None, poll: float = 2.0
) -> str:
    """Wait for a flow run to reach a final state; returns the state's name (``Completed``,
    ``Failed``, ``Crashed``, ...). Raises ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with api_client(url) as client:
        while True:
            state = client.read_flow_run(UUID(flow_run_id)).state
            if state is not None and state.is_final():
                return state.name
            if time.monotonic() > deadline:
                name = state.name if state else None
                raise TimeoutError(f"flow run {flow_run_id} still {name} after {timeout:.0f} s")
            time.sleep(poll)


def serve(root: str = ".", cron: str = CRON) -> None:
    """The one-process option: register the ``nightly`` deployment on ``cron`` (UTC) and run
    its flow runs in this process's children until interrupted (no work pool or worker)."""
    from flows.pipeline import pipeline

    pipeline.serve(name="nightly", cron=cron, parameters={"root": str(Path(root).resolve())})


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.deploy serve [--root R] [--cron C]``."""
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    served = sub.add_parser("serve", help="serve the nightly deployment in this process")
    served.add_argument("--root", default=".", help="project root (default: .)")
    served.add_argument("--cron", default=CRON, help=f"schedule, UTC (default: {CRON!r})")
    args = parser.parse_args(argv)
    serve(args.root, args.cron)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The project's shared local Prefect server, started on first use and stopped when idle.

Without ``PREFECT_API_URL``, Prefect starts a temporary server in every process that runs a
flow, and stops it at exit: several seconds each time, once per stage under a bare ``dvc
repro``. ``cmkd run`` and ``cmkd stage`` instead use one server per ``PREFECT_HOME`` (the
project's ``.cmkd/prefect``): the first command that needs it starts it in the background
(the services of Prefect's temporary server, no scheduler, and the dashboard, which the runs'
"View at" links and the run's log point to; state in the same SQLite file), the next ones
find it through ``local-server.json`` and reuse it. Each command holds a lease
(``leases/PID``) while it runs; the server exits by itself once no lease has been held for
``CMKD_SERVER_IDLE_SECONDS`` (default 600). ``cmkd server --stop`` stops it now; with
``PREFECT_API_URL`` set (a server of your own, ``cmkd server``, Prefect Cloud) none is started.

The server is ``python -m cmkd_app.local_server --port P`` with its output in
``local-server.log``; ``local-server.lock`` keeps two commands from starting two servers and
the server from stopping while a command is picking it up.

A new SQLite database costs Prefect's migrations, about 8 s on 2 cores, once per project. The
first server on a machine keeps a copy of its freshly migrated, still empty database in the
user's cache (``$CMKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/cmkd``, else ``~/.cache/cmkd``), one
per Prefect version; the next projects' servers start from that copy.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tasks  # noqa: F401  (Prefect's offline defaults, before Prefect is imported)
from flows.deploy import HOST, api_url, healthy, log_tail, server_env

if TYPE_CHECKING:
    from fastapi import FastAPI

IDLE_SECONDS = 600.0
INFO = "local-server.json"


def idle_seconds() -> float:
    """How long the server outlives its last lease: ``CMKD_SERVER_IDLE_SECONDS`` or 600."""
    return float(os.environ.get("CMKD_SERVER_IDLE_SECONDS") or IDLE_SECONDS)


def prefect_home() -> Path:
    """The ``PREFECT_HOME`` this process uses (``tasks`` sets the project's default)."""
    return Path(os.environ["PREFECT_HOME"]).resolve()


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with (home / "local-server.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_info(home: Path) -> dict | None:
    try:
        info = json.loads((home / INFO).read_text())
        return info if _alive(int(info["pid"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _hold_lease(home: Path) -> None:
    """Mark this process as a user of the server until it exits."""
    leases = home / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    lease = leases / str(os.getpid())
    if not lease.exists():
        lease.touch()
        atexit.register(lease.unlink, missing_ok=True)


def live_leases(home: Path) -> list[int]:
    """The ids of the processes holding a lease on ``home``'s server; stale leases (their
    process gone) are removed."""
    live = []
    for lease in (home / "leases").glob("*"):
        if lease.name.isdigit() and _alive(int(lease.name)):
            live.append(int(lease.name))
        else:
            lease.unlink(missing_ok=True)
    return sorted(live)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


_early: dict = {}


def start_early() -> None:
    """Begin :func:`ensure_server` in a background thread, so that a server that has to start
    does so while this command imports Prefect and torch; :func:`ensure_server` then waits for
    it. Nothing happens when ``PREFECT_API_URL`` is set (in the environment or the profile)."""
    profiles = prefect_home() / "profiles.toml"
    configured = profiles.is_file() and "PREFECT_API_URL" in profiles.read_text()
    if os.environ.get("PREFECT_API_URL") or configured or "thread" in _early:
        return

    def work() -> None:
        try:
            _early["result"] = _ensure(prefect_home(), 120.0)
        except Exception as exc:  # raised again by ensure_server, in the caller's thread
            _early["error"] = exc

    _early["thread"] = threading.Thread(target=work, name="cmkd-local-server", daemon=True)
    _early["thread"].start()


def ensure_server(
    home: Path | None = None, timeout: float = 120.0, meanwhile: Sequence[str] = ()
) -> tuple[str, bool]:
    """The API URL of ``home``'s shared server (default: :func:`prefect_home`), started in the
    background if none answers, and a lease on it for this process. Returns the URL and
    whether this call (or :func:`start_early`) started it. Raises ``RuntimeError`` (with the
    end of its log) if a new server exits or does not answer within ``timeout`` seconds.

    While a server started by :func:`start_early` is still coming up, the modules named in
    ``meanwhile`` are imported, in order, until it answers: the work a run will need anyway,
    done on this core while the server starts on the other."""
    if home is None and "thread" in _early:
        for module in meanwhile:
            if not _early["thread"].is_alive():
                break
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        _early["thread"].join()
        if "error" in _early:
            raise _early["error"]
        return _early["result"]
    return _ensure(prefect_home() if home is None else Path(home).resolve(), timeout)


def _ensure(home: Path, timeout: float) -> tuple[str, bool]:
    with _locked(home):
        _hold_lease(home)  # first: a server starting now must not see itself idle and stop
        info = _read_info(home)
        if info is not None and healthy(info["url"]):
            return info["url"], False
        port = _free_port()
        log = home / "local-server.log"
        env = server_env(home, port)
        env.update(
            {"PREFECT_SERVER_UI_ENABLED": "true", "CMKD_SERVER_IDLE_SECONDS": str(idle_seconds())}
        )
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cmkd_app.local_server", "--port", str(port)],
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this command, untouched by its Ctrl-C
            )
        url = api_url(port)
        deadline = time.monotonic() + timeout
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(
                    f"the local Prefect server did not start; {log}:\n{log_tail(log)}"
                )
            time.sleep(0.1)
        info = {"url": url, "pid": proc.pid, "port": port, "started": time.time()}
        (home / INFO).write_text(json.dumps(info) + "\n")
        return url, True


def stop_server(home: Path | None = None, timeout: float = 20.0) -> int | None:
    """Stop ``home``'s shared server if one runs; returns its process id, or ``None``."""
    home = prefect_home() if home is None else Path(home).resolve()
    with _locked(home):
        info = _read_info(home)
        (home / INFO).unlink(missing_ok=True)
    if info is None:
        return None
    pid = int(info["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return pid


def _watch(home: Path, server, idle: float) -> None:
    """Ask ``server`` (a uvicorn server) to exit once no lease has been held for ``idle``
    seconds; the info file goes first, under the lock, so no command picks up a server that
    is stopping."""
    last_used = time.monotonic()
    while not server.should_exit:
        time.sleep(min(1.0, idle / 4))
        if live_leases(home):
            last_used = time.monotonic()
        elif time.monotonic() - last_used > idle:
            with _locked(home):
                if live_leases(home):
                    continue
                info = _read_info(home)
                if info is not None and int(info["pid"]) == os.getpid():
                    (home / INFO).unlink(missing_ok=True)
                server.should_exit = True


def cache_dir() -> Path:
    """Where cmkd keeps per-user files that outlive a project: ``$CMKD_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/cmkd``, else ``~/.cache/cmkd``."""
    if os.environ.get("CMKD_CACHE_DIR"):
        return Path(os.environ["CMKD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cmkd"


def _sqlite_path() -> Path | None:
    """The SQLite file of the server's database, or ``None`` for another database."""
    url = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix) or ":memory:" in url:
        return None
    return Path(url.removeprefix(prefix))


def _copy_sqlite(source: Path, target: Path) -> None:
    """Copy SQLite database ``source`` to ``target`` through SQLite's backup (consistent even
    if ``source`` is open), written beside ``target`` first and then renamed into place."""
    import sqlite3

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with (
            contextlib.closing(sqlite3.connect(source)) as src,
            contextlib.closing(sqlite3.connect(partial)) as dst,
        ):
            src.backup(dst)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _template() -> Path:
    """The per-user template database for the Prefect version and collections installed."""
    from importlib.metadata import distributions

    installed = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in distributions()
        if (d.metadata["Name"] or "").lower().startswith("prefect")
    )
    key = hashlib.sha256("\n".join(installed).encode()).hexdigest()[:16]
    return cache_dir() / "prefect-db" / f"prefect-{key}.db"


async def _migrate_and_register() -> None:
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)
        await session.commit()


def prepare_database() -> tuple[str, bool]:
    """Make sure the server's SQLite database exists, migrated and with Prefect's block types
    registered, from the per-user template when there is one (see the module's docstring).
    Returns what was done, for the log, and whether the database is ready as it is (the
    server then skips its own block registration). Other databases are left to Prefect."""
    database = _sqlite_path()
    if database is None or database.exists():
        return "database: existing", False
    template = _template()
    if template.is_file():
        _copy_sqlite(template, database)
        return f"database: copied from {template}", True
    import asyncio

    asyncio.run(_migrate_and_register())
    try:
        _copy_sqlite(database, template)
    except OSError as exc:  # a read-only cache: fine, the next project migrates again
        return f"database: migrated (no template kept: {exc})", True
    return f"database: migrated, template kept at {template}", True


def with_dashboard(app: FastAPI, ui: FastAPI) -> None:
    """Serve ``ui`` (Prefect's dashboard app) at ``/`` of ``app`` in place of the empty one that
    an ephemeral server mounts there, so that the "View at ..." links of the runs' logs and
    the address the run log names lead to the dashboard while the server lives."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "name", None) != "ui"]
    app.mount("/", app=ui, name="ui")


def main(argv: list[str] | None = None) -> int:
    """Run the server in this process (what :func:`ensure_server` starts)."""
    parser = argparse.ArgumentParser(prog="python -m cmkd_app.local_server")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    os.environ["PREFECT__SERVER_EPHEMERAL"] = "1"  # a temporary server's services only
    import uvicorn
    from prefect.server.api.server import create_app, create_ui_app
    from prefect.settings import (
        PREFECT_API_BLOCKS_REGISTER_ON_START,
        PREFECT_API_DATABASE_MIGRATE_ON_START,
        temporary_settings,
    )

    said, ready = prepare_database()
    print(said, flush=True)
    app = create_app(ephemeral=True, final=True)  # the temporary server's services only
    with_dashboard(app, create_ui_app(ephemeral=False))
    server = uvicorn.Server(
        uvicorn.Config(app, host=HOST, port=args.port, log_level="error", lifespan="on")
    )
    watcher = threading.Thread(
        target=_watch, args=(prefect_home(), server, idle_seconds()), daemon=True
    )
    watcher.start()
    skip = (PREFECT_API_BLOCKS_REGISTER_ON_START, PREFECT_API_DATABASE_MIGRATE_ON_START)
    with temporary_settings(dict.fromkeys(skip, False) if ready else {}):
        server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

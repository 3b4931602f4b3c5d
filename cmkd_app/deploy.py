"""``cmkd server``, ``cmkd deploy`` and ``cmkd worker``: a local Prefect server, the work pool
and the nightly deployment of ``prefect.yaml`` (flows/deploy.py), and a process worker that
runs it in this checkout."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from flows.deploy import (
    DEPLOYMENT,
    HOST,
    POOL,
    api_url,
    dashboard_url,
    deploy,
    ensure_pool,
    healthy,
    prefect_command,
    serve,
    server_env,
)


def local_env(root: Path, port: int) -> dict[str, str]:
    """:func:`server_env` for the project at ``root``: ``PREFECT_HOME`` in its state folder
    (``.cmkd/prefect``) unless the environment names another."""
    home = Path(os.environ.get("PREFECT_HOME") or Path(root) / ".cmkd" / "prefect")
    home.mkdir(parents=True, exist_ok=True)
    return server_env(home, port)


def command(action: str, root: Path, port: int, serve_here: bool = False) -> int:
    """What ``cmkd server``, ``cmkd deploy`` and ``cmkd worker`` do (``action``), for the
    project at ``root`` and a local server on 127.0.0.1:``port``; returns the exit status.

    ``server`` and ``worker`` replace this process with Prefect's (so that a signal to it
    reaches the server or worker itself) and run until stopped; ``deploy`` creates the
    work pool if needed and deploys ``prefect.yaml`` (or, with ``serve_here``, serves the
    deployment in this process instead)."""
    root = Path(root).resolve()
    env = local_env(root, port)
    os.chdir(root)
    # A background job of a script starts with SIGINT ignored, and an ignored signal stays
    # ignored across exec; Prefect's worker answers SIGTERM by sending itself SIGINT, so it
    # would never stop. Restore the default before becoming the server or worker.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if action == "server":  # becomes the server process: a signal to it stops the server
        command = prefect_command("server", "start", "--host", HOST, "--port", str(port))
        env["PREFECT_SERVER_UI_ENABLED"] = "true"  # the dashboard at dashboard_url(port)
        print(
            f"cmkd: Prefect server for {root}: dashboard at {dashboard_url(port)}, "
            f"API at {api_url(port)}",
            flush=True,  # before exec replaces this process and its buffers
        )
        os.execve(sys.executable, [*command, "--analytics-off", "--ui"], env)
    if not healthy(env["PREFECT_API_URL"]):
        print(
            f"cmkd: no Prefect server answers at {env['PREFECT_API_URL']}; start one with "
            f"`cmkd server --port {port}`",
            file=sys.stderr,
        )
        return 2
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
    if action == "worker":  # becomes the worker process, likewise
        worker_env = {**env, "CMKD_ROOT": str(root)}
        command = prefect_command("worker", "start", "--pool", POOL, "--type", "process")
        os.execve(sys.executable, command, worker_env)
    if serve_here:
        serve(str(root))
        return 0
    created = ensure_pool(POOL, url=env["PREFECT_API_URL"])
    print(f"cmkd: work pool {POOL!r} {'created' if created else 'exists'}")
    print(deploy(root, env=env), end="")
    print(deploy_hint(port))
    return 0


def deploy_hint(port: int) -> str:
    """What ``cmkd deploy`` says to do next: start a worker, and trigger a run now with a
    ``prefect`` command that reaches the server on ``port`` whatever the shell's settings."""
    return (
        f"cmkd: start a worker with `cmkd worker --port {port}`; a run now: "
        f"`PREFECT_API_URL={api_url(port)} prefect deployment run {DEPLOYMENT}`"
    )

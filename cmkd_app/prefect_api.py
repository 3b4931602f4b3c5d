"""Which Prefect API a command's flows report to."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any


def run_flow(function: Callable[..., Any], meanwhile: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``function(**kwargs)`` (a flow, or code that runs flows) against the configured Prefect
    API or, if none is, the project's shared local server (cmkd_app/local_server.py), not a
    temporary one; ``meanwhile``: modules to import while that server starts."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    updates = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if not PREFECT_API_URL.value():
        from cmkd_app.local_server import ensure_server

        url, started = ensure_server(meanwhile=meanwhile)
        updates[PREFECT_API_URL] = url
        logging.getLogger("cmkd").info(
            "Prefect API: the project's local server at %s (%s); its dashboard: %s",
            url,
            "started now" if started else "already running",
            url.removesuffix("/api"),
        )
    with temporary_settings(updates):
        return function(**kwargs)

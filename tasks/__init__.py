"""Prefect tasks: the I/O around one cmkd_core call each.

Importing this package sets the offline defaults for Prefect before Prefect is imported
(no analytics, no telemetry, state under the project's ``.cmkd/prefect``), unless the
environment already says otherwise.
"""

import os
from pathlib import Path

_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
}
for _key, _value in _DEFAULTS.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".cmkd" / "prefect"))
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

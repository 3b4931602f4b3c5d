"""What ``cmkd run`` and ``cmkd stage`` show a person, and where the rest goes.

``cmkd run`` prints one line per stage (the records the pipeline flow logs with
``extra={"cmkd_line": True}``), on a terminal a progress bar redrawn in place for the stage
that is running, then the summary. Everything else Prefect and DVC say (every stage's own log,
DVC's advice, a failure's traceback) goes to a per-run log file and, as before, to the Prefect
API; ``-v`` shows it live instead. Deployments do not come here: their flow and task logs are
Prefect's, untouched.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import sys
from pathlib import Path

FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"


def _console_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()]
    loggers += [
        logging.getLogger(name)
        for name, item in logging.root.manager.loggerDict.items()
        if isinstance(item, logging.Logger)
    ]
    return [
        (logger, handler)
        for logger in loggers
        for handler in logger.handlers
        if isinstance(handler, PrefectConsoleHandler)
    ]


class _NoTracebacks(logging.Filter):
    """Drops the log records that carry a traceback (Prefect logs one for a failed run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Traceback (most recent call last)" not in record.getMessage()


class _StageLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "cmkd_line", False))


class _LiveBar:
    """Redraws one line in place on a terminal: the running stage's latest progress bar."""

    def __init__(self, stream):
        self.stream = stream
        self.shown = False

    def __call__(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[K" + text.strip()[:width])
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


class _LineHandler(logging.StreamHandler):
    def __init__(self, stream, bar: _LiveBar | None):
        super().__init__(stream)
        self.bar = bar
        self.setFormatter(logging.Formatter("%(message)s"))
        self.addFilter(_StageLines())

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is not None:
            self.bar.clear()
        super().emit(record)


def quiet_tracebacks() -> None:
    """``cmkd stage`` without ``-v``: Prefect's console shows no traceback (the error itself
    is printed once, by the command)."""
    for _, handler in _console_handlers():
        handler.addFilter(_NoTracebacks())


def run_console(logs: Path, verbose: bool) -> Path:
    """Set up ``cmkd run``'s output (module docstring); returns the run's log file."""
    from tasks import dvc

    logs.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = logs / f"run-{stamp}.log"
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(to_file)
    for logger, handler in _console_handlers():
        if not verbose:
            logger.removeHandler(handler)
        if (
            logger is logging.getLogger() or not logger.propagate
        ) and to_file not in logger.handlers:
            logger.addHandler(to_file)
    for name in ("prefect.flow_runs", "prefect.task_runs", "cmkd"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        bar = _LiveBar(sys.stdout) if sys.stdout.isatty() else None
        logging.getLogger().addHandler(_LineHandler(sys.stdout, bar))
        dvc.live_output = bar
    return path

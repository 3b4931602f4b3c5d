"""Seconds this process spent computing: in training loops and the export's parity runs.

``cmkd run`` runs every stage inside its one process (tasks/stage_host.py), so what is left of its
wall time after these seconds is its overhead: starting Python, imports, the Prefect server,
DVC's hashing, writing files. The run log and the run record state both (:func:`report`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

_spent: dict[str, float] = {}


@contextlib.contextmanager
def computing(kind: str) -> Iterator[None]:
    """Count the block's wall seconds as ``kind`` ("training", "parity")."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _spent[kind] = _spent.get(kind, 0.0) + time.perf_counter() - start


def spent() -> dict[str, float]:
    """Seconds per kind counted so far in this process."""
    return dict(_spent)


def process_seconds() -> float:
    """Wall seconds since this process started (its interpreter's start, not its first import)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def report() -> dict[str, float]:
    """This process's wall seconds so far, the compute seconds per kind and the rest, the
    overhead: ``{"wall": ., "training": ., "parity": ., "overhead": .}`` (rounded to 0.1 s)."""
    wall = process_seconds()
    kinds = {kind: _spent.get(kind, 0.0) for kind in ("training", "parity")}
    figures = {"wall": wall, **kinds, "overhead": wall - sum(kinds.values())}
    return {key: round(value, 1) for key, value in figures.items()}

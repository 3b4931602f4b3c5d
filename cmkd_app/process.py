"""The end of a cmkd process: Python's part of the interpreter's shutdown, then ``os._exit``.

A process that has imported torch, torch._dynamo, Prefect and the ONNX exporter spends about
2 s on 2 cores tearing down modules and C++ statics after its last line is printed. Nothing in
that teardown is ours to wait for: the threads are joined and Prefect's queues of logs and
events are sent by threading's and atexit's hooks, which run first, as they would at a normal
exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Join the threads, run the atexit hooks, flush stdout and stderr, then ``os._exit(code)``.

    Also what a forked child must do: C++ destructors of libraries loaded before the fork would
    join threads that only the parent has, and abort."""
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

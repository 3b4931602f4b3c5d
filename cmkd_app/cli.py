"""The ``cmkd`` command.

cmkd run              the whole pipeline through DVC (stale stages only), then a summary
cmkd stage NAME       one stage's flow in this process (what dvc.yaml runs)
cmkd summary          print the summary of the last run
cmkd bench            the method benchmark (table and JSON under bench/results)
cmkd bank inspect     classes, counts, feature size and val accuracy of a teacher bank
cmkd import FORMAT SRC LABELS OUT   a contract dataset from your arrays or WAV files
cmkd import-layout KIND SRC OUT   teacher + student datasets from CREMA-D, AVE, VGGSound, RAVDESS
cmkd predict M INPUT  classes of .npy (or .wav) inputs with an exported student (onnxruntime)
cmkd serve M          an HTTP server for an exported student on 127.0.0.1
cmkd seeds            several seeds of the distill stage at once on a Dask cluster
cmkd server           a local Prefect server and its dashboard (SQLite in .cmkd/prefect) on
                      http://127.0.0.1:4200;
                      --stop: stop the background one that cmkd run and cmkd stage share
cmkd deploy           the work pool and the nightly deployment of prefect.yaml (--serve: one
                      process instead); cmkd worker: a process worker that runs it here

Outside a project (no dvc.yaml in --root) the commands that work on one stop at once with
exit status 2 (cmkd_app/project.py); predict, serve, import and import-layout work anywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tasks  # noqa: F401  (Prefect's offline defaults, before Prefect is imported)
from cmkd_app import commands
from cmkd_app.parser import build_parser

WITH_LAYOUT = {
    "bank": commands.bank_inspect,
    "import": commands.import_files,
    "import-layout": commands.import_layout,
    "seeds": commands.seeds,
    "bench": commands.bench,
    "run": commands.run,
    "push": commands.push,
    "summary": commands.summary,
}
"""The commands that run under :func:`main`'s error handling, given the project's layout."""


def main(argv: list[str] | None = None) -> int:
    """Run one ``cmkd`` command (``argv``: its arguments, default ``sys.argv[1:]``); returns the
    exit status: 0, 2 for bad input (data, params, a bank), 1 for anything else."""
    args = build_parser(__doc__).parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    from cmkd_app.project import refuse_outside_project

    refused = refuse_outside_project(args)  # before any server, import or file
    if refused is not None:
        return refused
    if args.command in ("predict", "serve"):
        return commands.predict_or_serve(args)  # onnxruntime only: no torch, Prefect or DVC
    if args.command == "stage":  # under `cmkd run`, the pipeline's process runs the stage
        from cmkd_app.stage import delegated

        code = delegated(args)
        if code is not None:
            return code
    if args.command in ("run", "stage"):  # the local server, if needed, starts meanwhile
        from cmkd_app.local_server import start_early

        start_early()
    if args.command == "server" and args.stop:
        from cmkd_app.local_server import stop_server

        pid = stop_server()
        print(f"cmkd: stopped the local Prefect server (pid {pid})" if pid else "cmkd: none runs")
        return 0
    if args.command in ("server", "deploy", "worker"):
        from cmkd_app.deploy import command

        return command(args.command, Path(args.root), args.port, getattr(args, "serve", False))
    return _guarded(args)


def _guarded(args: argparse.Namespace) -> int:
    """Run a command that works on the project, turning an exception into one line on stderr
    and an exit status (a traceback too with ``--verbose``)."""
    from tasks.layout import Layout

    try:
        if args.command == "stage":
            from cmkd_app.stage import run_here

            return run_here(args)
        return WITH_LAYOUT[args.command](args, Layout(Path(args.root)))
    except Exception as exc:
        if _bad_input(exc):
            return _failed(str(exc), 2)
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        return _failed(f"{type(exc).__name__}: {exc}", 1)


def _bad_input(exc: Exception) -> bool:
    """Whether ``exc`` says the input (data, params, a bank) is bad: exit status 2. The classes
    are imported here, not at the top, so that commands which never load torch start fast."""
    from cmkd_core.bank import BankError
    from cmkd_core.config import ParamsError
    from cmkd_core.data import DataContractError

    return isinstance(exc, (DataContractError, ParamsError, BankError))


def _failed(message: str, code: int) -> int:
    """Print the error once and return ``code``."""
    print(f"cmkd: {message}", file=sys.stderr)
    return code


def entry() -> None:
    """The ``cmkd`` console script: :func:`main`, then an exit that skips the interpreter's
    teardown of torch and Prefect (about 2 s; cmkd_app/process.py)."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        if "-v" in sys.argv or "--verbose" in sys.argv:
            import traceback

            traceback.print_exc()
        print("cmkd: interrupted", file=sys.stderr)
        code = 130
    from cmkd_app.process import exit_now

    exit_now(code)


if __name__ == "__main__":
    entry()

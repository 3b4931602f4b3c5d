"""Tasks of the ``pipeline`` flow: DVC pulls, says what is stale, reproduces, pushes.

Each is a Prefect task with its own log (DVC's output goes to the task's run logger) and
retries where a retry can help: pulling and pushing touch the remote; a stage is retried once.
DVC runs through its Python API in this process (a ``dvc`` process costs about 0.4 s to
start); the stage commands that ``dvc repro`` starts hand their stages back to this process
(tasks/stage_host.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import selectors
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.layout import Layout
from tasks.stage_host import StageHost


class StageFailedError(RuntimeError):
    """``dvc repro`` of a stage, or a DVC command around it, exited non-zero.

    ``exit_code`` is what ``cmkd`` exits with: the failed stage's own (2 for bad data or
    params, 1 for a crash), 1 when DVC itself failed.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


LiveHook = Callable[[str], None]
live_output: LiveHook | None = None
"""Set by ``cmkd run`` on a terminal: called with each redraw of a progress bar (a chunk of a
stage's output that ends in a carriage return), so the bar can redraw in place."""


def stage_environment(api_url: str | None, run: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and the stage commands it runs: this interpreter's ``bin`` first
    on PATH (so ``cmkd`` resolves), the Prefect API the stage flows report to, if given, and
    the name and id of the pipeline's flow run (``CMKD_RUN_NAME``, ``CMKD_RUN_ID``), which the
    export stage writes into the model card."""
    env = os.environ.copy()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if api_url:
        env["PREFECT_API_URL"] = api_url
    for key, value in (run or {}).items():
        env[f"CMKD_RUN_{key.upper()}"] = value
    return env


class _Output:
    """What DVC and the stage print, written in chunks: each complete line goes to ``logger``
    (of a progress bar redrawn with carriage returns, the last state), each redraw to
    :data:`live_output` when set. A file-like object, so a stage run in this process can write
    to it as the command's process would; DVC's thread and the stage's may both write."""

    def __init__(self, logger):
        self.logger = logger
        self.pending = ""
        self.lock = threading.RLock()

    def write(self, text: str) -> int:
        with self.lock:
            return self._write(text)

    def _write(self, text: str) -> int:
        self.pending += text
        *complete, self.pending = self.pending.split("\n")
        for raw in complete:
            line = raw.split("\r")[-1]
            if line.strip():
                self.logger.info("%s", line)
        if "\r" in self.pending and live_output is not None:
            redraws = [part for part in self.pending.split("\r") if part.strip()]
            if redraws:
                live_output(redraws[-1])
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        """Log an unfinished last line too."""
        with self.lock:
            if self.pending.strip():
                self.logger.info("%s", self.pending.split("\r")[-1])
            self.pending = ""


@contextlib.contextmanager
def _repo(root: Path, logger=None, messages: list[str] | None = None) -> Iterator:
    """DVC's ``Repo`` for ``root``; what it prints goes to the task's log (``logger``, by
    default the task's run logger) rather than to the terminal, its log records too at debug
    level and, given ``messages``, into that list; DVC's failures become
    :class:`StageFailedError`."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    logger = logger or get_run_logger()

    class Forward(logging.Handler):  # what DVC logs (what it prints is captured below)
        def emit(self, record: logging.LogRecord) -> None:
            logger.debug("%s: %s", record.name, record.getMessage())
            if messages is not None:
                messages.append(record.getMessage())

    handler = Forward(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data", "dvc_objects")]
    saved = [(one.handlers[:], one.propagate) for one in loggers]  # DVC adds its own
    for one in loggers:
        one.handlers = [handler]
        one.propagate = False
    output = _Output(logger)
    try:
        with (
            contextlib.redirect_stdout(output),
            contextlib.redirect_stderr(output),
            Repo(str(root)) as repo,
        ):
            yield repo
    except DvcException as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise StageFailedError(f"DVC failed in {root}: {exc}{cause}") from exc
    finally:
        output.close()
        for one, (handlers, propagate) in zip(loggers, saved, strict=True):
            one.handlers, one.propagate = handlers, propagate


def _reproduce(root: Path, stage: str, env: dict[str, str], host: StageHost | None) -> list[str]:
    """``dvc repro --single-item STAGE`` through DVC's API, on a helper thread, while this
    thread answers the stage command it starts (``host``: its flow runs here, on the caller's
    thread, where Ctrl-C lands and the task's Prefect context is). Returns DVC's log messages;
    raises :class:`StageFailedError` if DVC or the stage failed."""
    logger = get_run_logger()
    messages: list[str] = []
    failure: list[BaseException] = []
    done, signal_done = os.pipe()

    def work() -> None:
        try:
            # in root, as `dvc repro` would run there: DVC reads stage names and paths from the
            # working directory (the process's: the stage host's chdir is into root too)
            with contextlib.chdir(root), _repo(root, logger, messages) as repo:
                repo.reproduce(stage, single_item=True, run_env=env)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            os.write(signal_done, b".")

    # With this thread's context (Prefect's settings and run): DVC's log lines go to this
    # task's log through the same Prefect API, not to a temporary server of the thread's own.
    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(work,), name=f"dvc-{stage}", daemon=True)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(done, selectors.EVENT_READ)
            if host is not None:
                host.register(selector)
            worker.start()
            while True:
                events = selector.select()
                if any(key.data is None for key, _ in events):
                    break
                for key, _ in events:
                    key.data()
        worker.join()
    finally:
        if not worker.is_alive():  # else (Ctrl-C) it will still write: the pipe must stay open
            os.close(done)
            os.close(signal_done)
    if failure:
        raise failure[0]
    return messages


def _same_device(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (or, where they do not exist yet, their nearest existing
    parents) lie on one file system."""

    def existing(path: Path) -> Path:
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    return os.stat(existing(a)).st_dev == os.stat(existing(b)).st_dev


def same_disk_remote(repo) -> str | None:
    """The default remote's path when it is a folder on the file system of DVC's cache, where a
    push would only copy every artifact a second time onto the same disk; ``None`` for any other
    remote (an object store, another disk) or none. ``repo``: a ``dvc.repo.Repo``."""
    name = repo.config["core"].get("remote")
    if not name:
        return None
    url = str(repo.config["remote"][name]["url"])
    if "://" in url:
        return None
    return url if _same_device(Path(url), Path(repo.cache.local.path)) else None


def _with_remote(root: Path, action: str, force: bool = True) -> bool:
    """A pull or a push against the default remote; ``False`` without one, and for a push
    without ``force`` to a remote on the same disk as the cache (:func:`same_disk_remote`)."""
    logger = get_run_logger()
    with _repo(root) as repo:
        if not repo.config["core"].get("remote"):
            logger.info("no default DVC remote: nothing to %s", action)
            return False
        if action == "push" and not force and (url := same_disk_remote(repo)):
            logger.info(
                "not pushed: the default remote %s is on the disk of DVC's cache, where a push "
                "would only copy every artifact again (cmkd push, or cmkd run --push, does)",
                url,
            )
            return False
        if action == "pull":
            stats = repo.pull(allow_missing=True).get("stats", {})
            said = ", ".join(f"{len(v)} {k}" for k, v in stats.items() if k != "fetched" and v)
            logger.info("%d files fetched%s", stats.get("fetched", 0), f"; {said}" if said else "")
        else:
            logger.info("%d files pushed", repo.push())
    return True


@task(name="clear-unfinished", cache_policy=NONE)
def clear_unfinished(root: Path) -> list[str]:
    """Remove the workspace outputs of every stage whose last command did not finish (killed,
    interrupted or failed: ``.cmkd/unfinished/STAGE``, written by ``cmkd stage``). They are
    partial: a stage writes its files one by one (``auto``'s candidates as each ends), and DVC
    would refuse to check out over them ("unsaved files"). What a resume needs is not among
    them (``.cmkd/checkpoints``). Returns the stages cleared, in ``dvc.yaml`` order."""
    layout = Layout(root)
    spec = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    cleared = []
    for name, stage in spec.items():
        marker = layout.unfinished(name)
        if not marker.exists():
            continue
        removed = []
        for out in _paths(stage.get("outs", []) + stage.get("metrics", [])):
            path = root / out
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            removed.append(out)
        marker.unlink()
        cleared.append(name)
        get_run_logger().info(
            "%s: its last run did not finish; removed its partial outputs (%s); its resume "
            "checkpoints are kept",
            name,
            ", ".join(removed) or "none",
        )
    return cleared


@task(name="dvc-pull", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def pull(root: Path) -> bool:
    """Fetch what the remote has for this revision into the cache and the workspace (missing
    outputs are allowed: the first run has pushed nothing yet). ``False`` without a remote."""
    return _with_remote(root, "pull")


def _paths(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries]


def with_downstream(changed: list[str], spec: dict) -> list[str]:
    """``changed`` stages and every stage that reads an output of one of them, transitively,
    in the order of ``spec`` (a parsed ``dvc.yaml``). ``dvc status`` lists only the stages whose
    own inputs changed; those downstream of them run as well."""
    stages = spec.get("stages", {})
    outs = {
        name: _paths(stage.get("outs", []) + stage.get("metrics", []))
        for name, stage in stages.items()
    }
    result = set(changed)
    grew = True
    while grew:
        grew = False
        for name, stage in stages.items():
            if name in result:
                continue
            deps = _paths(stage.get("deps", []))
            produced = [o.rstrip("/") for r in result for o in outs.get(r, [])]
            if any(d == o or d.startswith(o + "/") for d in deps for o in produced):
                result.add(name)
                grew = True
    return [name for name in stages if name in result]


@task(name="dvc-status", cache_policy=NONE)
def stale_stages(root: Path) -> list[str]:
    """The stages that will run, in ``dvc.yaml`` order: those whose own dependencies,
    parameters or outputs changed (``dvc status``) and those downstream of them; empty when
    the workspace matches ``dvc.lock``: nothing to do."""
    with _repo(root) as repo:
        changed = sorted(name.split(":")[-1] for name in repo.status())
    stale = with_downstream(changed, yaml.safe_load((root / "dvc.yaml").read_text()))
    after = [s for s in stale if s not in changed]
    get_run_logger().info(
        "stale: %s%s",
        ", ".join(s for s in stale if s in changed) or "nothing",
        f" (and downstream of them: {', '.join(after)})" if after else "",
    )
    return stale


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a stage that crashed, not one that refused bad data or params (exit status 2)."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, StageFailedError) and error.exit_code == 2)


@task(
    name="dvc-repro",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=_worth_retrying,
    cache_policy=NONE,
)
def reproduce_stage(
    stage: str,
    root: Path,
    api_url: str | None,
    run: dict[str, str] | None = None,
    host: StageHost | None = None,
) -> str:
    """Run ``dvc repro --single-item STAGE`` in ``root`` (with ``host``, the stage's command has
    its flow run in this process: tasks/stage_host.py). Returns ``"ran"``, ``"restored"``
    (DVC's run cache had the outputs of these very inputs and checked them out) or
    ``"skipped"`` (unchanged)."""
    get_run_logger().info("dvc repro %s", stage)
    env = stage_environment(api_url, run)
    if host is not None:
        env.update(host.environment())
    last_error = Layout(root).last_error
    last_error.unlink(missing_ok=True)
    try:
        messages = _reproduce(root, stage, env, host)
    except StageFailedError as exc:
        try:  # the stage's own error, as `cmkd stage` wrote it
            error = json.loads(last_error.read_text())
        except (OSError, ValueError):
            error = None
        if error is not None and error.get("stage") == stage:
            raise StageFailedError(
                f"stage {stage!r} failed: {error['message']}", error["exit"]
            ) from exc
        raise StageFailedError(f"stage {stage!r} failed: {exc}") from exc
    if any(m.startswith(f"Running stage '{stage}'") for m in messages):
        return "ran"
    return "restored" if any("is cached - skipping run" in m for m in messages) else "skipped"


@task(name="dvc-push", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def push(root: Path, force: bool = False) -> bool:
    """Upload the cached outputs to the default remote; ``False`` without one, and, unless
    ``force``, for a remote on the same disk as DVC's cache (:func:`same_disk_remote`)."""
    return _with_remote(root, "push", force)

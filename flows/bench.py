"""The ``bench-grid`` flow: the method benchmark's runs as Prefect tasks (``cmkd bench``,
cmkd_app/bench.py, builds the grid and writes the table).

Each teacher and each run is a task, named by its
pair, pairing, budget, method, control and seed, on prefect-dask's ``DaskTaskRunner``: a local
cluster of ``--jobs`` single-threaded worker processes (default: one per core), or the
scheduler at ``--address tcp://HOST:8786``; ``--jobs 1`` runs them one after another in this
process. A pair's runs are submitted as soon as its teacher's bank exists; a run whose worker
died is run again (by Dask on another worker, then by the task's retries). Workers load the
pairs' data themselves (the project and its data at the same path on every machine) and get
the bank from the flow; every task trains on one thread, so where it ran does not change its
numbers. Each finished run is appended to ``NAME.runs.jsonl`` at once; with ``--resume`` the
same command skips the runs already there (made with the same params,
cmkd_core/benchmark/runs.py), so a killed benchmark
resumes, whichever worker or machine ran them, and part of a grid can be run on another machine
and its file brought back. Without it the file starts afresh: a
changed code base must not reuse old runs. Teacher banks are cached under ``.cmkd/bench/banks``,
keyed by the teacher params and a hash of the teacher data; ``--fresh-teachers`` retrains.
"""

from __future__ import annotations

import json
import os
import queue
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture

from cmkd_core.bank import FileBankCache, TeacherBank
from cmkd_core.benchmark.plan import (
    Grid,
    Run,
    build_bank,
    control_bank,
    grid_outlook,
    load_pair,
    prepare,
    record_line,
    run_one,
)
from cmkd_core.benchmark.runs import done_runs, run_settings
from cmkd_core.config import DataParams, DistillParams, TeacherParams


def default_jobs() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


_loaded: dict[tuple[str, str], tuple] = {}


def _pair_data(pair: str, data: DataParams) -> tuple:
    """Pair ``pair``'s teacher and student datasets, loaded once per worker process."""
    key = (pair, data.model_dump_json())
    if key not in _loaded:
        _loaded[key] = load_pair(pair, data)
    return _loaded[key]


def train_teacher(pair: str, data: DataParams, params: TeacherParams) -> tuple[TeacherBank, float]:
    """Train (and bank) the teacher of ``pair`` on one thread; the bank and its test accuracy."""
    torch.set_num_threads(1)
    return build_bank(_pair_data(pair, data)[0], params)


def train_run(
    run: Run, data: DataParams, bank: TeacherBank, distill: DistillParams, unlabelled: int = 0
) -> dict:
    """Train the student of ``run`` on one thread against ``bank`` (the teacher's: the run's
    control is applied here), ``unlabelled`` of its classes without labels; its record."""
    torch.set_num_threads(1)
    student = _pair_data(run.pair, data)[1]
    return run_one(run, student, control_bank(bank, run.control), distill, unlabelled)


# Tasks made from the named functions (not by decorating them): Dask pickles a function by its
# module and name, which must lead back to the function itself, not to the task object.
teacher_task = task(
    train_teacher, name="bench-teacher", task_run_name="teacher {pair}", cache_policy=NONE
)
run_task = task(
    train_run,
    name="bench-run",
    task_run_name="{run.label}",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=1,
)


@flow(name="bench-grid", log_prints=False, validate_parameters=False)
def bench_grid(
    grid: Grid,
    data: DataParams,
    banks: str,
    fresh_teachers: bool,
    runs_file: str,
    resume: bool,
) -> tuple[list[dict], dict]:
    """Every run of ``grid`` on the flow's task runner, but those already in ``runs_file`` with
    ``resume``: teachers first (or from the bank cache in folder ``banks``), a pair's runs as
    soon as its bank exists. Each new record is appended to ``runs_file`` as its run ends.
    Returns the records in table order and per-pair teacher facts."""
    settings = run_settings(grid, data)
    cache = FileBankCache(Path(banks), fresh_teachers, log=lambda line: print(line, flush=True))
    work = prepare(grid, data, done_runs(Path(runs_file), settings) if resume else [])
    teachers: dict[str, dict] = {}
    pending: dict[PrefectFuture, tuple[str, str | Run]] = {}
    # Each future says once that it is done. (prefect.futures.as_completed over the pending
    # futures, called again after each one, would register a new waiter on every pending
    # future each time: quadratic in the grid's size, on the scheduler's event loop.)
    finished: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()

    def submitted(future: PrefectFuture, what: tuple[str, str | Run]) -> None:
        pending[future] = what
        future.add_done_callback(finished.put)

    def bank_ready(key: str, bank: TeacherBank, accuracy: float) -> None:
        for pair in work.pairs_of(key):
            teachers[pair] = {"test_accuracy": accuracy, "rows": len(bank.labels)}
            print(f"[{pair}] teacher test accuracy {accuracy:.4f}", flush=True)
            outlook = grid_outlook(grid, work.students[pair], bank)
            if outlook is not None:
                teachers[pair]["outlook"] = outlook
                print(
                    f"[{pair}] before training, raw inputs against the teacher over the "
                    f"labelled classes: r = {outlook['r_mean']:+.2f} (mean of "
                    f"{len(outlook['r'])} draws): {outlook['verdict']}",
                    flush=True,
                )
            for run in work.todo[pair]:
                future = run_task.submit(run, data, bank, grid.distill, grid.unlabelled_classes)
                submitted(future, ("run", run))

    for key, dataset in work.teacher_sets.items():
        name = dataset.root.name.strip("<>")
        hit = cache.get(key, name)
        if hit is not None:
            bank_ready(key, *hit)
        else:
            pair = work.pairs_of(key)[0]
            submitted(teacher_task.submit(pair, data, grid.teacher), ("teacher", key))
    with Path(runs_file).open("ab") as sink:
        while pending:
            future = finished.get()
            kind, what = pending.pop(future)
            if kind == "teacher":
                bank, accuracy = future.result()
                cache.put(what, work.teacher_sets[what].root.name.strip("<>"), bank)
                bank_ready(what, bank, accuracy)
                continue
            record = future.result()
            work.records[what.index] = record
            sink.write((json.dumps({"settings": settings, "record": record}) + "\n").encode())
            sink.flush()
            print(record_line(record), flush=True)
    return [work.records[i] for i in sorted(work.records)], teachers


def task_runner(jobs: int, address: str | None = None):
    """Where the grid's tasks run: the Dask scheduler at ``address``; else a local cluster of
    ``jobs`` worker processes of one thread each; ``jobs == 1``: this process."""
    if address is None and jobs <= 1:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from flows.seeds import dask_runner

    return dask_runner(jobs, address)

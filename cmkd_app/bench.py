"""``cmkd bench``: the grid the command line asks for, run by the ``bench-grid`` flow
(flows/bench.py), then its table and JSON under ``--out``.

Quick grid: digits->fsdd and mnist->mnist8x8 (paired and unpaired), the CE-only student,
``fixmatch``, ``sinkhorn_ssl`` (with its shuffled and random-prototype controls), the paper's
``joint`` at two weights, ``hinton_kd`` (with its shuffled control) and ``auto``, 5 and 10
labels per class, 3 seeds. Full grid: the pairs, every method and variant, 5/10/20/all
labels per class, 5 seeds, shuffled controls for ``fa``, ``la``, ``joint``, ``sinkhorn_ssl``
and ``hinton_kd`` and the random-prototype control for ``sinkhorn_ssl``. Writes ``NAME.json``
(every run, the summary, the grid) and ``NAME.md`` (the table) under ``--out``, and prints the
table; NAME is ``methods-quick`` or ``methods`` unless ``--name`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import yaml

from cmkd_app.prefect_api import run_flow
from cmkd_core.benchmark.plan import PAIRS, Grid, pair_missing
from cmkd_core.benchmark.runs import done_runs, run_settings
from cmkd_core.benchmark.summary import (
    geometry_table,
    headline_table,
    markdown_table,
    outlook_table,
    summarise,
    unseen_rows,
    unseen_table,
    with_auto,
)
from cmkd_core.config import DistillParams, load_params
from cmkd_core.data import write_text_atomic
from cmkd_core.distill.auto import VARIANTS
from cmkd_core.distill.methods import list_methods
from flows.bench import bench_grid, default_jobs, task_runner
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
        unlabelled_classes=args.unlabelled_classes,
    )


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
    settings = run_settings(grid, data)
    done = done_runs(runs_file, settings) if args.resume else []
    if done:
        print(f"resuming: {len(done)} runs already in {runs_file}", flush=True)
    start = time.perf_counter()
    with runs_file.open("a+b" if args.resume else "w+b") as sink:
        if sink.tell() and (sink.seek(-1, os.SEEK_END), sink.read(1))[1] != b"\n":
            sink.write(b"\n")  # end a torn last line so the next record starts on its own

    runner = task_runner(args.jobs or default_jobs(), args.address)
    records, teachers = run_flow(
        bench_grid.with_options(task_runner=runner),
        grid=grid,
        data=data,
        banks=str(layout.root / ".cmkd" / "bench" / "banks"),
        fresh_teachers=args.fresh_teachers,
        runs_file=str(runs_file),
        resume=args.resume,
    )
    rows, unseen = summarise(records), unseen_rows(records)
    table = geometry_table(records) + "\n" + headline_table(rows) + "\n" + markdown_table(rows)
    table += ("\n" + unseen_table(unseen)) if unseen else ""
    outlook = outlook_table(teachers)
    table += ("\n" + outlook) if outlook else ""
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
        **({"unseen_summary": unseen} if unseen else {}),
        "runs": with_auto(records),
    }
    write_text_atomic(out / f"{name}.json", json.dumps(payload, indent=1) + "\n")
    write_text_atomic(out / f"{name}.md", table)
    print(table)
    print(f"wrote {out / name}.json and .md in {payload['wall_seconds']:.0f} s")
    return 0

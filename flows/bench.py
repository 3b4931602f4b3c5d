"""``cmkd bench``: the method benchmark, in this process (no Prefect server needed).

Quick grid (about 15 minutes on 2 cores): digits->fsdd and mnist->mnist8x8 (paired and
unpaired), every method, 5 and 10 labels per class, 3 seeds, shuffled-teacher controls for
``la`` and ``joint``. Full grid: the three pairs, 5/10/20/all labels per class, 5 seeds,
controls for ``fa``, ``la`` and ``joint``. Writes ``NAME.json`` (every run, the summary, the
grid) and ``NAME.md`` (the table) under ``--out``, and prints the table; NAME is
``methods-quick`` or ``methods`` unless ``--name`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from cmkd_core.benchmark import PAIRS, Grid, markdown_table, run_grid, summarise
from cmkd_core.config import DistillParams, load_params
from cmkd_core.data import write_text_atomic
from cmkd_core.distill.methods import list_methods
from tasks.layout import Layout

CONTROLS = ("fa", "la", "joint")
QUICK_CONTROLS = ("la", "joint")  # the quick grid drops fa's control to stay under 15 minutes


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
        methods=tuple(args.methods or list_methods()),
        budgets=tuple(None if b == "all" else int(b) for b in budgets),
        seeds=tuple(range(seeds)),
        controls=QUICK_CONTROLS if args.quick else CONTROLS,
        distill=distill,
        teacher=params.teacher.model_copy(update={"device": "cpu"}),
    )


def run_benchmark(args: argparse.Namespace, layout: Layout) -> int:
    grid = grid_from(args, layout)
    wheel = layout.root / load_params(layout.params).data.fsdd_wheel
    start = time.perf_counter()
    records, teachers = run_grid(grid, wheel, log=lambda line: print(line, flush=True))
    rows = summarise(records)
    table = markdown_table(rows)
    name = args.name or ("methods-quick" if args.quick else "methods")
    out = Path(args.out)
    payload = {
        "command": "cmkd " + " ".join(args.argv),
        "grid": {
            "pairs": grid.pairs,
            "methods": grid.methods,
            "seeds": grid.seeds,
            "budgets": ["all" if b is None else b for b in grid.budgets],
            "controls": grid.controls,
            "distill": grid.distill.model_dump(mode="json"),
            "teacher": grid.teacher.model_dump(mode="json"),
        },
        "teachers": teachers,
        "wall_seconds": time.perf_counter() - start,
        "summary": rows,
        "runs": records,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.json", json.dumps(payload, indent=1) + "\n")
    write_text_atomic(out / f"{name}.md", table)
    print(table)
    print(f"wrote {out / name}.json and .md in {payload['wall_seconds']:.0f} s")
    return 0

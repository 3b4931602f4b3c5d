"""Several seeds (and methods) of the distill stage at once, on a Dask cluster.

``cmkd seeds --seeds 0 1 2 --methods joint ce --workers 2`` trains one student per
(method, seed) from the pipeline's current bank and student data, each a Prefect task run by
``prefect-dask``'s task runner: a local cluster of ``--workers`` single-threaded processes by
default, or an existing scheduler with ``--address tcp://HOST:8786`` (start one with
``dask scheduler`` and ``dask worker tcp://HOST:8786 --nthreads 1`` on each machine that has a
checkout of the project and its data at the same path). Nothing of the pipeline's outputs is
written; the results (test accuracy at the best validation epoch, per method: mean and standard
deviation over seeds) go to ``.cmkd/seeds.json`` and the terminal.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NONE

from cmkd_core.bank import load_bank
from cmkd_core.config import load_params
from cmkd_core.data import check_dataset, write_text_atomic
from cmkd_core.distill import accuracy_of, resolve_device
from cmkd_core.recipes import fit_student
from tasks.layout import Layout


def train_seed(root: str, method: str, seed: int) -> dict:
    """Train the ``method`` student with ``distill.seed = seed`` from ``root``'s bank and student
    data (one thread: the cluster's processes share the cores); return its accuracies."""
    torch.set_num_threads(1)
    layout = Layout(Path(root))
    params = load_params(layout.params).distill.model_copy(update={"seed": seed})
    bank = load_bank(layout.bank)
    dataset = check_dataset(layout.student_data, classes=bank.classes)
    device = resolve_device(params.device)
    fitted, data = fit_student(dataset, bank, params, method, device, progress=False)
    return {
        "method": method,
        "seed": seed,
        "best_epoch": fitted.result.best_epoch,
        "val_accuracy": fitted.result.best_val_accuracy,
        "test_accuracy": accuracy_of(fitted.model, data["test"]),
        "worker_pid": os.getpid(),
    }


# A task made from the named function (not by decorating it): Dask pickles the function by its
# module and name, which must lead back to the function itself, not to the task object.
distill_seed = task(train_seed, name="distill-seed", cache_policy=NONE)


def summarise(runs: Sequence[dict]) -> dict[str, dict]:
    """Per method: seeds, test accuracies, their mean and (sample) standard deviation."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        accuracies = [r["test_accuracy"] for r in runs if r["method"] == method]
        out[method] = {
            "seeds": [r["seed"] for r in runs if r["method"] == method],
            "test_accuracy": accuracies,
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        }
    return out


@flow(name="seeds")
def seeds(root: str = ".", seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] = ()) -> dict:
    """Submit one task per (method, seed) to the flow's task runner; gather and summarise.
    ``methods`` defaults to ``distill.method`` and ``ce``."""
    root = str(Path(root).resolve())
    if not methods:
        methods = list(dict.fromkeys([load_params(Layout(Path(root)).params).distill.method, "ce"]))
    futures = [distill_seed.submit(root, m, s) for m in methods for s in seeds]
    runs = [future.result() for future in futures]
    result = {"runs": runs, "summary": summarise(runs)}
    write_text_atomic(Path(root) / ".cmkd" / "seeds.json", json.dumps(result, indent=1) + "\n")
    return result


def dask_runner(workers: int = 2, address: str | None = None):
    """prefect-dask's ``DaskTaskRunner``: on the scheduler at ``address``, or on a local
    cluster of ``workers`` processes of one thread each (no dashboard, the cluster's routine
    log lines not shown)."""
    import dask
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand memory
    # back after nearly every step of a small torch model: training ran 40-50 % slower.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    # The cluster's housekeeping runs in this process (scheduler and nannies) and in the
    # workers, on the cores the training needs: a 10 ms statistical profiler in each worker,
    # a 20 ms event-loop tick and a 100 ms memory poll per nanny, a 500 ms system monitor
    # in each, all for a dashboard that is off. Slower where it is only bookkeeping.
    dask.config.set(
        {
            "distributed.worker.profile.enabled": False,
            "distributed.admin.tick.interval": "1s",
            "distributed.admin.system-monitor.interval": "5s",
            "distributed.worker.memory.monitor-interval": "1s",
        }
    )
    cluster = {"n_workers": workers, "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_kwargs={**cluster, "dashboard_address": None})


def run_on_dask(
    root: str,
    seed_list: Sequence[int],
    methods: Sequence[str] = (),
    workers: int = 2,
    address: str | None = None,
) -> dict:
    """:func:`seeds` on a :func:`dask_runner`."""
    return seeds.with_options(task_runner=dask_runner(workers, address))(
        root=root, seeds=list(seed_list), methods=list(methods)
    )

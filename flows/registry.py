"""The pipeline's stages, in order: the one list that the stage flows (flows/stages.py), the
pipeline flow, ``cmkd stage``, the stage worker and the check against ``dvc.yaml``
(tests/flows/test_registry.py) read.

Adding a stage: an entry here, its flow in flows/stages.py (a function named as the stage),
its task module under ``tasks/``, and its entry in ``dvc.yaml`` (``cmd: cmkd stage NAME``, the
task module among its deps, ``outs``/``metrics`` as listed here). Nothing here imports
Prefect or torch: the command line reads it before it knows whether it needs them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage of ``dvc.yaml``."""

    name: str
    """The stage's name in ``dvc.yaml``, its flow's name, and ``cmkd stage NAME``."""
    task: str
    """The module of its tasks, imported when the flow runs (e.g. ``tasks.data``)."""
    outs: tuple[str, ...]
    """What it writes, relative to the project root: ``dvc.yaml``'s ``outs`` and ``metrics``."""
    warm: tuple[str, ...] = ()
    """Modules it imports besides its task module, slow enough to import ahead of time."""

    @property
    def task_file(self) -> str:
        """The task module's file, relative to the project root, as ``dvc.yaml`` lists it."""
        return self.task.replace(".", "/") + ".py"


STAGES = (
    Stage("prepare", "tasks.data", ("data/prepared/teacher", "data/prepared/student")),
    Stage("validate", "tasks.data", ("data/validated/report.json",)),
    Stage(
        "teacher",
        "tasks.train",
        (
            "data/teacher/teacher.safetensors",
            "data/teacher/bank.safetensors",
            "data/teacher/metrics.json",
        ),
        warm=("cmkd_core.bank", "torch._dynamo"),  # the optimisers' first step imports dynamo
    ),
    Stage("distill", "tasks.train", ("data/distill",)),
    Stage("evaluate", "tasks.evaluate", ("data/evaluate/metrics.json", "data/evaluate/plots")),
    Stage(
        "export",
        "tasks.export",
        ("data/export",),
        warm=("torch.onnx._internal.exporter._compat",),
    ),
)

NAMES = tuple(stage.name for stage in STAGES)


def stage_modules() -> tuple[str, ...]:
    """Every module the stages import, in the order the pipeline needs them, once each."""
    ordered: dict[str, None] = {}
    for stage in STAGES:
        ordered.update(dict.fromkeys((stage.task, *stage.warm)))
    return tuple(ordered)

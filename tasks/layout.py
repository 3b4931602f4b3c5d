"""Where each stage reads and writes, relative to the project root (see dvc.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Paths of every stage's inputs and outputs under ``root``."""

    root: Path = Path(".")

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def teacher_data(self) -> Path:
        return self.root / "data" / "prepared" / "teacher"

    @property
    def student_data(self) -> Path:
        return self.root / "data" / "prepared" / "student"

    @property
    def validation_report(self) -> Path:
        return self.root / "data" / "validated" / "report.json"

    @property
    def teacher_dir(self) -> Path:
        return self.root / "data" / "teacher"

    @property
    def teacher_weights(self) -> Path:
        return self.teacher_dir / "teacher.safetensors"

    @property
    def bank(self) -> Path:
        return self.teacher_dir / "bank.safetensors"

    @property
    def teacher_metrics(self) -> Path:
        return self.teacher_dir / "metrics.json"

    @property
    def distill_dir(self) -> Path:
        return self.root / "data" / "distill"

    def student_weights(self, method: str) -> Path:
        return self.distill_dir / f"student_{method}.safetensors"

    def history(self, method: str) -> Path:
        return self.distill_dir / f"history_{method}.json"

    @property
    def metrics(self) -> Path:
        return self.root / "data" / "evaluate" / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "data" / "evaluate" / "plots"

    @property
    def onnx(self) -> Path:
        return self.root / "data" / "export" / "student.onnx"

    @property
    def onnx_int8(self) -> Path:
        return self.root / "data" / "export" / "student.int8.onnx"

    @property
    def model_card(self) -> Path:
        return self.root / "data" / "export" / "model_card.json"

    @property
    def validation_problems(self) -> Path:
        """Every violation the last failed validation found (not a DVC output: DVC deletes a
        stage's outputs before it runs the stage)."""
        return self.root / ".cmkd" / "reports" / "validation-problems.txt"

    @property
    def last_error(self) -> Path:
        """The error of the last failed ``cmkd stage``, read by the pipeline flow."""
        return self.root / ".cmkd" / "last-error.json"

    def unfinished(self, stage: str) -> Path:
        """Marks ``stage`` as started and not finished: written when its command starts, removed
        when it succeeds. Left by a kill, Ctrl-C or a failure, it tells the next ``cmkd run``
        that the stage's outputs in the workspace are partial (tasks/dvc.py)."""
        return self.root / ".cmkd" / "unfinished" / stage

    @property
    def logs(self) -> Path:
        """Where ``cmkd run`` writes each run's full log."""
        return self.root / ".cmkd" / "logs"

    def checkpoint(self, name: str) -> Path:
        """The resume checkpoint of a training run (not a DVC output: DVC deletes a stage's
        outputs before it runs the stage again)."""
        return self.root / ".cmkd" / "checkpoints" / f"{name}.pt"

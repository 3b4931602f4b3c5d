"""Issue 14, smaller things: ``cmkd bank inspect`` prints the class order, the run summary words
the labelled budget by the student's modality, ``cmkd predict | head`` exits quietly, and the
confusion matrix keeps long class names apart."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from onnx import TensorProto, helper

from cmkd_app.show import bank_text, summary_text

ROOT = Path(__file__).resolve().parents[2]


def test_bank_inspect_prints_the_class_order_with_indices():
    classes = ["Bag", "Coat", "Dress"]
    counts = {s: dict.fromkeys(classes, 2) for s in ("train", "val", "test")}
    facts = {
        "rows": 18,
        "feature_dim": 4,
        "classes": classes,
        "counts": counts,
        "val_accuracy": 0.5,
        "info": {"source": "embeddings"},
    }
    lines = bank_text(facts).splitlines()
    assert "  class order (head rows): 0=Bag 1=Coat 2=Dress" in lines
    assert any(line.split()[:1] == ["Coat"] for line in lines)  # the per-class table stays


def _metrics(**student) -> dict:
    result = {"test_accuracy": 0.8, "test_macro_f1": 0.79, "labelled_train": 40, **student}
    return {
        "method": "joint",
        "teacher": {"val_accuracy": 0.9, "test_accuracy": 0.9},
        "student": result,
        "ce_only": {"test_accuracy": 0.7, "test_macro_f1": 0.69},
        "gain_over_ce": {"test_accuracy": 0.1, "test_macro_f1": 0.1},
    }


def test_summary_words_the_labelled_budget_by_the_students_modality():
    def budget(**student):
        return summary_text(_metrics(**student), "student.onnx").splitlines()[-2]

    assert budget().endswith("(40 labelled student samples)")  # the metrics do not say
    assert budget(modality="image", kind="fixed").endswith("(40 labelled student images)")
    assert budget(modality="audio", kind="sequence").endswith("(40 labelled student clips)")
    assert budget(modality="tokens", kind="sequence").endswith("(40 labelled student sequences)")
    assert "clips" not in summary_text(_metrics(modality="image"), "s.onnx")


def _tiny_student(path: Path, features: int = 4, classes: int = 3) -> None:
    """An ONNX student ``x (N, features) -> logits (N, classes)``: one matrix product."""
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, (features, classes), np.arange(features * classes) / 10.0
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_predict_exits_quietly_when_the_reader_closes_the_pipe(tmp_path):
    _tiny_student(tmp_path / "student.onnx")
    np.save(tmp_path / "batch.npy", np.random.default_rng(0).normal(size=(3000, 4)).astype("f4"))
    command = [sys.executable, "-m", "cmkd_app.cli", "predict", str(tmp_path / "student.onnx")]
    for extra in (["--json"], []):
        child = subprocess.Popen(
            [*command, str(tmp_path / "batch.npy"), *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert child.stdout.read(200)  # some output came ...
        child.stdout.close()  # ... and the reader left, as `head` does, long before its end
        stderr = child.stderr.read().decode()
        assert child.wait(timeout=120) == 141, stderr
        assert stderr == "", stderr  # no BrokenPipeError traceback, no "Exception ignored"
    whole = subprocess.run(
        [*command, str(tmp_path / "batch.npy")], cwd=ROOT, capture_output=True, text=True
    )
    lines = whole.stdout.splitlines()
    assert whole.returncode == 0 and len(lines) == 1 + 3000  # the header, then one per sample
    assert lines[0].split("\t") == ["input", "class", "p(class)", "probabilities"]
    assert lines[1].split("\t")[0] == f"{tmp_path / 'batch.npy'}[0]"


def test_confusion_png_rotates_long_names_so_they_do_not_overlap(tmp_path):
    from tasks.evaluate import _confusion

    classes = [f"class-name-{i:04d}" for i in range(10)]  # 15 characters each
    assert {len(c) for c in classes} == {15}
    y_true = np.repeat(np.arange(10), 5)
    y_pred = np.roll(y_true, 3)
    fig = _confusion(y_true, y_pred, classes, "joint", tmp_path)
    png = (tmp_path / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG") and (tmp_path / "confusion.csv").is_file()
    ax = fig.axes[0]
    ticks = ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == classes
    assert all(t.get_rotation() == 45 and t.get_horizontalalignment() == "right" for t in ticks)
    # Neighbouring rotated names are parallel lines: apart by spacing * sin(45 degrees), which
    # must exceed the text's height, so they do not overlap.
    canvas = FigureCanvasAgg(fig)  # the figure was closed once saved: draw it again
    canvas.draw()
    renderer = canvas.get_renderer()
    xs = [ax.transData.transform((i, 0))[0] for i in range(10)]
    height = fig.dpi * ticks[0].get_fontsize() / 72
    assert min(np.diff(xs)) * math.sin(math.radians(45)) > 1.2 * height
    # The row names (horizontal) do not overlap either.
    boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert all(not a.overlaps(b) for a, b in itertools.pairwise(boxes))
    # Short names (the digits) stay upright.
    upright = _confusion(y_true, y_pred, [str(i) for i in range(10)], "ce", tmp_path)
    assert upright.axes[0].get_xticklabels()[0].get_rotation() == 0


def test_summary_of_auto_says_what_won_and_by_how_much_on_validation():
    metrics = _metrics(modality="audio")
    metrics.update(
        method="auto",
        chosen="sinkhorn_ssl",
        candidates_val_accuracy={"ce": 0.845, "joint": 0.838, "sinkhorn_ssl": 0.925},
    )
    lines = summary_text(metrics, "student.onnx").splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["sinkhorn_ssl", "ce", "joint"]
    assert "sinkhorn_ssl vs ce on validation: +8.00 points" in lines[4]
    shipped = next(line for line in lines if "shipped student" in line)
    assert "(auto: sinkhorn_ssl)" in shipped and "test accuracy 0.8000" in shipped
    assert lines[-2].startswith("  shipped vs CE-only on test: +10.00 points")


def test_the_summary_says_whether_the_teacher_and_student_agree_on_which_classes_are_alike():
    def geometry(r: float, p: float) -> str:
        metrics = {**_metrics(), "class_similarity": {"correlation": r, "p_value": p}}
        return summary_text(metrics, "student.onnx").splitlines()[-2]

    shared = geometry(0.71, 0.002)
    assert shared.startswith("  class geometry, teacher vs CE-only student: r = +0.71 (p = 0.002)")
    assert "the student finds alike too" in shared
    assert "little shared class structure" in geometry(0.04, 0.41)
    assert "little shared class structure" in geometry(0.5, 0.2)  # not significant
    assert "class geometry" not in summary_text(_metrics(), "student.onnx")  # older metrics


def test_the_summary_gives_labelled_unlabelled_and_h_when_some_classes_had_no_label():
    metrics = _metrics()
    metrics["unlabelled_classes"] = ["0", "7", "8"]
    metrics["chosen"], metrics["candidates_val_accuracy"] = (
        "sinkhorn_ssl",
        {"ce": 0.5, "sinkhorn_ssl": 0.7},
    )
    for role, (seen, unseen, h) in {
        "student": (0.59, 0.31, 0.41),
        "ce_only": (0.61, 0.0, 0.0),
    }.items():
        metrics[role].update(
            test_accuracy_labelled_classes=seen, test_accuracy_unlabelled_classes=unseen, test_h=h
        )
    text = summary_text(metrics, "student.onnx")
    assert "auto: candidates by validation score" in text
    assert "classes with no label in training (0, 7, 8), test accuracy:" in text
    assert "shipped student  labelled classes 0.5900   unlabelled classes 0.3100   H 0.4100" in text
    assert "CE-only student  labelled classes 0.6100   unlabelled classes 0.0000   H 0.0000" in text
    assert "classes with no label" not in summary_text(_metrics(), "student.onnx")

"""Task of the ``evaluate`` stage: test metrics of the distilled and CE-only students, plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from cmkd_core.align.measure import alignment, class_geometry, pca_2d, projected_features
from cmkd_core.bank import load_bank
from cmkd_core.data import atomic_path, check_dataset, write_text_atomic
from cmkd_core.data.tensors import samples_of
from cmkd_core.distill import predict_logits
from cmkd_core.distill.auto import students_of
from cmkd_core.metrics import classification_report, confusion_matrix
from cmkd_core.models.checkpoint import load_classifier
from tasks.data import write_json
from tasks.layout import Layout


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _save_png(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _learning_curves(histories: dict[str, list[dict]], plots: Path) -> None:
    """CSV columns are named by role (``student``, ``ce_only``) so dvc.yaml need not change
    with the method; the PNG legend names the methods."""
    rows = []
    for i in range(max(len(h) for h in histories.values())):
        row = {"epoch": i + 1}
        for role, history in zip(("student", "ce_only"), histories.values(), strict=False):
            if i < len(history):
                row[f"val_accuracy_{role}"] = history[i]["val_accuracy"]
                row[f"train_loss_{role}"] = history[i]["loss"]
        rows.append(row)
    write_text_atomic(plots / "learning_curves.csv", _csv(rows))
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, history in histories.items():
        epochs = [r["epoch"] for r in history]
        ax_acc.plot(epochs, [r["val_accuracy"] for r in history], label=method)
        ax_loss.plot(epochs, [r["loss"] for r in history], label=method)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="Student validation accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Student training loss")
    ax_acc.legend()
    ax_loss.legend()
    _save_png(fig, plots / "learning_curves.png")


def _confusion(y_true, y_pred, classes: list[str], method: str, plots: Path) -> plt.Figure:
    """Write ``confusion.csv`` (one row per test sample: actual, predicted) and
    ``confusion.png`` from the labels ``y_true`` and ``y_pred`` (both ``(n,)`` class indices);
    return the (closed) figure. The figure grows with the number of classes and the longest
    name, and names longer than two characters are written at 45 degrees on the x axis, right
    end under their column, so that long names do not overlap."""
    rows = [
        {"actual": classes[t], "predicted": classes[p]} for t, p in zip(y_true, y_pred, strict=True)
    ]
    write_text_atomic(plots / "confusion.csv", _csv(rows))
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    longest = max((len(c) for c in classes), default=1)
    side = max(3.5, 0.42 * len(classes))  # inches of matrix: ~0.42 per class
    names = 0.075 * longest  # inches a name takes at font size 8
    fig, ax = plt.subplots(figsize=(side + names + 1.5, side + 0.75 * names + 1.2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in ((ij, matrix[ij]) for ij in zip(*matrix.nonzero(), strict=True)):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xlabel="predicted",
        ylabel="actual",
        title=f"Test confusion matrix ({method} student)",
    )
    rotation = 45 if longest > 2 else 0
    ax.set_xticklabels(
        classes,
        rotation=rotation,
        ha="right" if rotation else "center",
        rotation_mode="anchor",
        fontsize=8,
    )
    ax.set_yticklabels(classes, fontsize=8)
    _save_png(fig, plots / "confusion.png")
    return fig


def _feature_map(bank, dataset, models: dict, plots: Path, per_class: int = 60) -> None:
    """Bank rows and each student's projected validation features in one 2-D PCA frame."""
    train = torch.nonzero(bank.split("train")).flatten()
    keep = torch.cat([train[bank.labels[train] == c][:per_class] for c in range(len(bank.classes))])
    clouds = {"teacher": (bank.features[keep], bank.labels[keep])}
    for role, model in models.items():
        clouds[role] = projected_features(model, dataset, bank.classes)
    flat = pca_2d(*(f for f, _ in clouds.values()))
    rows = [
        {"x": float(x), "y": float(y), "source": role, "class": bank.classes[int(c)]}
        for (role, (_, labels)), points in zip(clouds.items(), flat, strict=True)
        for (x, y), c in zip(points, labels, strict=True)
    ]
    write_text_atomic(plots / "features_2d.csv", _csv(rows))
    students = [r for r in clouds if r != "teacher"]
    fig, axes = plt.subplots(1, len(students), figsize=(5.2 * len(students), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, role in zip(axes[0], students, strict=True):
        for name, marker, size, alpha in (("teacher", "o", 10, 0.35), (role, "x", 14, 0.9)):
            labels = clouds[name][1].numpy()
            points = flat[list(clouds).index(name)]
            ax.scatter(
                points[:, 0],
                points[:, 1],
                c=[cmap(k % 10) for k in labels],
                s=size,
                marker=marker,
                alpha=alpha,
                linewidths=0.8,
            )
        ax.set(title=f"{role}: x = student (val), o = teacher bank", xticks=[], yticks=[])
    _save_png(fig, plots / "features_2d.png")


def _selection(layout: Layout, method: str) -> dict:
    """What ``auto`` chose, and every candidate's validation accuracy (``{}`` otherwise)."""
    if method != "auto":
        return {}
    selection = json.loads((layout.distill_dir / "selection.json").read_text())
    return {"chosen": selection["chosen"], "candidates_val_accuracy": selection["candidates"]}


@task(name="evaluate-students", cache_policy=NONE)
def evaluate_students(layout: Layout, method: str) -> dict:
    """Test accuracy and macro-F1 of each student at its best-validation epoch, plus plots."""
    teacher = json.loads(layout.teacher_metrics.read_text())
    results, histories, predictions, models = {}, {}, {}, {}
    bank = load_bank(layout.bank)
    classes = list(bank.classes)  # the students' class indices follow the bank's
    dataset = check_dataset(layout.student_data, classes=classes)
    test = samples_of(dataset, dataset.rows("test"), classes)
    y_true = test.labels.numpy()
    for name in students_of(method):
        model, _, info = load_classifier(layout.student_weights(name))
        models[name] = model
        y_pred = predict_logits(model, test).argmax(1).numpy()
        report = classification_report(y_true, y_pred, len(classes))
        results[name] = {
            "test_accuracy": report["accuracy"],
            "test_macro_f1": report["macro_f1"],
            "val_accuracy": info["val_accuracy"],
            "best_epoch": info["best_epoch"],
            "labelled_train": info["labelled_train"],
            "modality": dataset.meta.modality,
            "kind": dataset.meta.kind,
            "n_test": report["n"],
            **alignment(model, bank, dataset),
        }
        histories[name] = json.loads(layout.history(name).read_text())["history"]
        predictions[name] = (y_true, y_pred)
    metrics = {
        "method": method,
        **_selection(layout, method),
        "teacher": {k: teacher[k] for k in ("val_accuracy", "test_accuracy")},
        "student": results[method],
        "ce_only": results["ce"],
        "gain_over_ce": {
            "test_accuracy": results[method]["test_accuracy"] - results["ce"]["test_accuracy"],
            "test_macro_f1": results[method]["test_macro_f1"] - results["ce"]["test_macro_f1"],
        },
        # does the teacher's class geometry match the student's? (cmkd_core/align/similarity.py)
        "class_similarity": class_geometry(models["ce"], bank, dataset)
        if len(classes) >= 3
        else None,
    }
    layout.plots.mkdir(parents=True, exist_ok=True)
    _learning_curves(histories, layout.plots)
    _confusion(*predictions[method], classes, method, layout.plots)
    roles = {"student_ce_only": models["ce"], f"student_{method}": models[method]}
    _feature_map(
        bank, dataset, roles if method != "ce" else {"student_ce": models["ce"]}, layout.plots
    )
    write_json(layout.metrics, metrics)
    get_run_logger().info("metrics: %s", json.dumps(metrics))
    return metrics

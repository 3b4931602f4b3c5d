"""Task of the ``evaluate`` stage: test metrics of the distilled and CE-only students, plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from cmkd_core.align.measure import alignment, class_geometry, pca_2d, projected_features
from cmkd_core.bank import load_bank
from cmkd_core.data import atomic_path, check_dataset, write_text_atomic
from cmkd_core.data.tensors import samples_of
from cmkd_core.distill import predict_logits
from cmkd_core.distill.auto import students_of
from cmkd_core.metrics import classification_report, confusion_matrix, seen_unseen
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


FEATURE_MAP_DPI = 110
PANEL_INCHES = (4.6, 4.4)
"""Width and height of one panel of ``features_2d.png``; a column of the class legend adds
:data:`LEGEND_INCHES` to the width."""
LEGEND_INCHES = 1.4


def _class_colours(n: int) -> list:
    """``n`` distinguishable colours, one per class."""
    if n <= 10:
        return [plt.get_cmap("tab10")(k) for k in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(k) for k in range(n)]
    return [plt.get_cmap("turbo")(k / (n - 1)) for k in range(n)]


def feature_map_figure(
    clouds: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    titles: dict[str, str] | None = None,
) -> plt.Figure:
    """The figure of ``features_2d.png``: one panel per cloud of ``clouds`` (name -> points
    ``(n, 2)`` in the shared PCA frame and class indices ``(n,)``; ``teacher`` is the bank),
    each scaled to its own points, so that a student whose projected features lie in a small
    corner of the teacher's range is as legible as the teacher; the ticks give each panel's
    scale. Points are coloured by class, with one legend of every class name beside the
    panels; ``titles`` names the panels (default: the cloud names)."""
    titles = titles or {}
    colours = np.array(_class_colours(len(classes)))
    columns = 1 + (len(classes) - 1) // 25
    width = PANEL_INCHES[0] * len(clouds) + LEGEND_INCHES * columns
    fig, axes = plt.subplots(
        1,
        len(clouds),
        figsize=(width, PANEL_INCHES[1]),
        dpi=FEATURE_MAP_DPI,
        squeeze=False,
        layout="constrained",
    )
    for ax, (name, (points, labels)) in zip(axes[0], clouds.items(), strict=True):
        teacher = name == "teacher"
        ax.scatter(
            points[:, 0],
            points[:, 1],
            c=colours[np.asarray(labels, dtype=int)],
            s=12 if teacher else 16,
            marker="o" if teacher else "x",
            alpha=0.6 if teacher else 0.85,
            linewidths=0 if teacher else 0.9,
        )
        ax.set_title(titles.get(name, name), fontsize=10)
        ax.set_xlabel("principal axis 1 (shared frame)", fontsize=9)
        ax.set_ylabel("principal axis 2 (shared frame)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25, linewidth=0.5)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=colours[k], label=name)
        for k, name in enumerate(classes)
    ]
    fig.legend(
        handles=handles, title="class", loc="outside right center", ncols=columns, fontsize=8
    )
    fig.suptitle(
        "Teacher bank (train rows) and students' projected validation features: "
        "one 2-D PCA frame, each panel at its own scale",
        fontsize=10,
    )
    return fig


def _feature_map(
    bank, dataset, models: dict, plots: Path, titles: dict[str, str], per_class: int = 60
) -> plt.Figure:
    """Bank rows and each student's projected validation features in one 2-D PCA frame:
    ``features_2d.csv`` (DVC plot data) and ``features_2d.png`` (:func:`feature_map_figure`,
    saved at its own size: :data:`PANEL_INCHES` a panel at :data:`FEATURE_MAP_DPI`). Returns
    the (closed) figure."""
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
    flat_clouds = {
        role: (points, labels.numpy())
        for (role, (_, labels)), points in zip(clouds.items(), flat, strict=True)
    }
    titles = {"teacher": "teacher bank (train rows)", **titles}
    fig = feature_map_figure(flat_clouds, list(bank.classes), titles)
    with atomic_path(plots / "features_2d.png") as tmp:
        fig.savefig(tmp, format="png", dpi=FEATURE_MAP_DPI)  # not "tight": a known size
    plt.close(fig)
    return fig


def _students_shown(models: dict, method: str, chosen: str | None) -> tuple[dict, dict]:
    """The students of ``features_2d`` by their role in its CSV (the CE-only one, then the
    shipped one), and the panels' titles."""
    if method == "ce":
        return {"student_ce": models["ce"]}, {"student_ce": "CE-only student (val clips)"}
    shipped = f"{method}: {chosen}" if chosen else method
    roles = {"student_ce_only": models["ce"], f"student_{method}": models[method]}
    titles = {
        "student_ce_only": "CE-only student (val clips)",
        f"student_{method}": f"shipped student ({shipped}, val clips)",
    }
    return roles, titles


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
    hidden = [classes.index(c) for c in dataset.unlabelled_classes if c in classes]
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
        if hidden:  # some classes had no label: generalised zero-shot accuracy, test split
            found = seen_unseen(y_true, y_pred, hidden)
            results[name].update({f"test_{key}": value for key, value in found.items()})
        histories[name] = json.loads(layout.history(name).read_text())["history"]
        predictions[name] = (y_true, y_pred)
    metrics = {
        "method": method,
        **_selection(layout, method),
        "teacher": {k: teacher[k] for k in ("val_accuracy", "test_accuracy")},
        **({"unlabelled_classes": list(dataset.unlabelled_classes)} if hidden else {}),
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
    roles, titles = _students_shown(models, method, metrics.get("chosen"))
    _feature_map(bank, dataset, roles, layout.plots, titles)
    write_json(layout.metrics, metrics)
    get_run_logger().info("metrics: %s", json.dumps(metrics))
    return metrics

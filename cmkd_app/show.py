"""What ``cmkd run``, ``cmkd summary`` and ``cmkd bank inspect`` print for a person."""

from __future__ import annotations


def summary_text(metrics: dict, onnx: str) -> str:
    """Human-readable result of a run: teacher, student and CE-only test accuracy. The labelled
    budget is worded by ``metrics["student"]["modality"]`` (clips for audio or video, images)
    or ``["kind"]`` (sequences) where present, else as samples."""
    student, ce = metrics["student"], metrics["ce_only"]
    modality = str(student.get("modality", "")).lower()
    samples = {"audio": "clips", "speech": "clips", "video": "clips", "image": "images"}.get(
        modality, {"sequence": "sequences"}.get(student.get("kind", ""), "samples")
    )
    gain = 100 * metrics["gain_over_ce"]["test_accuracy"]
    method = metrics["method"]
    if "chosen" in metrics:
        method = f"auto: {metrics['chosen']}"
    lines = []
    if "candidates_val_accuracy" in metrics:
        scores = metrics["candidates_val_accuracy"]
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        by = (
            "validation score (val accuracy on the labelled classes minus the distance of the "
            "predicted classes from the teacher's class proportions; only the students that name "
            "the most classes on the unlabelled clips may ship)"
            if "unlabelled_classes" in metrics
            else "validation accuracy"
        )
        lines = [
            f"auto: candidates by {by} (the first is shipped; ties go to ce)",
            *(f"  {name:<16} val {value:.4f}" for name, value in ranked),
            f"  {metrics['chosen']} vs ce on validation: "
            f"{100 * (scores[metrics['chosen']] - scores['ce']):+.2f} points",
        ]
    width = max(31, len(f"shipped student ({method})"))
    return "\n".join(
        [
            *lines,
            "cmkd results (test split, each model at its best validation epoch)",
            f"  {'teacher':<{width}}  test accuracy {metrics['teacher']['test_accuracy']:.4f}",
            f"  {f'shipped student ({method})':<{width}}  test accuracy "
            f"{student['test_accuracy']:.4f}   macro-F1 {student['test_macro_f1']:.4f}",
            f"  {'CE-only student (same budget)':<{width}}  test accuracy "
            f"{ce['test_accuracy']:.4f}   macro-F1 {ce['test_macro_f1']:.4f}",
            f"  shipped vs CE-only on test: {gain:+.2f} points"
            f" ({student['labelled_train']} labelled student {samples})",
            *unlabelled_lines(metrics),
            *geometry_line(metrics.get("class_similarity")),
            f"  ONNX student: {onnx}",
        ]
    )


def unlabelled_lines(metrics: dict) -> list[str]:
    """With classes that had no label: each student's test accuracy on the labelled classes,
    on the unlabelled ones, and their harmonic mean H."""
    if "unlabelled_classes" not in metrics:
        return []
    names = ", ".join(metrics["unlabelled_classes"])
    lines = [f"  classes with no label in training ({names}), test accuracy:"]
    for role, title in (("student", "shipped student"), ("ce_only", "CE-only student")):
        found = metrics[role]
        lines.append(
            f"    {title:<16} labelled classes {found['test_accuracy_labelled_classes']:.4f}"
            f"   unlabelled classes {found['test_accuracy_unlabelled_classes']:.4f}"
            f"   H {found['test_h']:.4f}"
        )
    return lines


def geometry_line(found: dict | None) -> list[str]:
    """The class-similarity diagnostic in one line, with what it means."""
    if not found:
        return []
    r, p = found["correlation"], found["p_value"]
    verdict = (
        "the classes the teacher finds alike, the student finds alike too"
        if r >= 0.3 and p < 0.05
        else "little shared class structure: expect gains from unlabelled data, not semantics"
    )
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return [f"  class geometry, teacher vs CE-only student: r = {r:+.2f} ({shown}): {verdict}"]


def bank_text(facts: dict) -> str:
    """``cmkd bank inspect`` for people: size, the class order (row ``i`` of the teacher head
    and logit ``i`` of a student are ``classes[i]``), rows per class and split, val accuracy."""
    counts = facts["counts"]
    lines = [
        f"teacher bank: {facts['rows']} rows, {facts['feature_dim']}-d features, "
        f"{len(facts['classes'])} classes",
        f"  teacher head accuracy on the bank's val rows: {facts['val_accuracy']:.4f}"
        if facts["val_accuracy"] is not None
        else "  no val rows",
        "  class order (head rows): "
        + " ".join(f"{i}={c}" for i, c in enumerate(facts["classes"])),
        "  class       train    val   test",
    ]
    for c in facts["classes"]:
        lines.append(
            f"  {c:<10} {counts['train'][c]:>6} {counts['val'][c]:>6} {counts['test'][c]:>6}"
        )
    if "nearest_class" in facts:
        lines.append(
            "  most similar class (cosine of class means in the teacher's space): "
            + ", ".join(f"{c}~{d} {v:.2f}" for c, (d, v) in facts["nearest_class"].items())
        )
    if facts.get("class_similarity"):
        lines += geometry_line(facts["class_similarity"])
    source = facts["info"].get("source", "trained by the pipeline")
    lines.append(f"  source: {source}")
    return "\n".join(lines)

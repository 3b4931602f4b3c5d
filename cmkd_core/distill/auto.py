"""``method: auto``: train a few candidates, ship the one with the best validation accuracy.

The candidates are the CE-only student, the paper's ``joint`` scheme at its default weights
and at a tenth of them, ``sinkhorn_ssl`` when there are unlabelled student samples, and
``hinton_kd`` when the data is paired. The CE-only student is always one of them and wins ties,
so ``auto`` never ships a student that is worse than CE *on validation*; test data is never
read to choose.

Named variants (``joint_w0.1``; ``sinkhorn_ssl_sem``, with the teacher's class semantics) are
a registered method with some params changed; they can be
used anywhere a method name is (``distill.method``, ``cmkd bench --methods``).
"""

from __future__ import annotations

from collections.abc import Mapping

VARIANTS: dict[str, tuple[str, dict]] = {
    "joint_w0.1": ("joint", {"w_fa": 0.1, "w_la": 0.1}),
    "sinkhorn_ssl_sem": ("sinkhorn_ssl", {"ssl": {"semantic": 0.3}}),
}
BASELINE = "ce"


def base_method(name: str) -> str:
    """The registered method a method or variant name trains."""
    return VARIANTS[name][0] if name in VARIANTS else name


def students_of(method: str) -> list[str]:
    """The students a run of ``method`` keeps: that method's (``auto`` for auto) and the
    CE-only baseline, once."""
    return [method] if method == BASELINE else [method, BASELINE]


def candidates(has_unlabelled: bool, paired: bool) -> list[str]:
    """What ``auto`` trains, the CE-only baseline first."""
    names = [BASELINE, "joint", "joint_w0.1"]
    if has_unlabelled:
        names.append("sinkhorn_ssl")
    if paired:
        names.append("hinton_kd")
    return names


def choose(
    val_accuracy: Mapping[str, float], classes_predicted: Mapping[str, int] | None = None
) -> str:
    """The candidate with the highest validation accuracy; ties go to the CE-only baseline,
    then to the earlier candidate. ``val_accuracy`` must hold the baseline. With
    ``classes_predicted`` (some classes had no label: how many classes each candidate predicts
    on the unlabelled samples), only the candidates that predict the most may be chosen."""
    if BASELINE not in val_accuracy:
        raise ValueError(f"auto needs the {BASELINE!r} candidate's validation accuracy")
    allowed = list(val_accuracy)
    if classes_predicted is not None:
        missing = [name for name in allowed if name not in classes_predicted]
        if missing:
            raise ValueError(f"auto: no classes_predicted for {', '.join(missing)}")
        most = max(classes_predicted[name] for name in allowed)
        allowed = [name for name in allowed if classes_predicted[name] == most]
    best = BASELINE if BASELINE in allowed else allowed[0]
    for name in allowed:
        if val_accuracy[name] > val_accuracy[best]:
            best = name
    return best

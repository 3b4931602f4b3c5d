"""The benchmark's records summarised: ``auto`` from its candidates, gains, tables.

Every summary row is one ``(pair, pairing, budget, method, control)``: a control
(``shuffled``, ``random_prototypes``) is its own row. Gains are paired over seeds (mean of the
per-seed differences, with a paired t-test): over the CE-only student, over the same method's
two controls and over the teacher-free ``fixmatch`` baseline.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from cmkd_core.distill.auto import candidates, choose

GAINS = {
    "gain_over_ce": "ce",
    "gain_over_fixmatch": "fixmatch",
    "gain_over_shuffled": "shuffled",
    "gain_over_random_prototypes": "random_prototypes",
}


def with_auto(records: Iterable[dict]) -> list[dict]:
    """``records`` plus one ``auto`` record per (pair, pairing, budget, seed) whose candidates
    (:func:`cmkd_core.distill.auto.candidates`: sinkhorn_ssl where the budget leaves unlabelled
    samples, hinton_kd where paired) all ran: a copy of the candidate chosen on validation
    accuracy, with ``chosen``, every candidate's ``candidates_val`` and their summed seconds.
    A candidate that does not use pairs may come from the unpaired run of the same cell."""
    records = [r for r in records if r["method"] != "auto"]
    index = {
        (r["pair"], r["pairing"], r["budget"], r["seed"], r["method"]): r
        for r in records
        if r["control"] == ""
    }
    cells = dict.fromkeys((k[0], k[1], k[2], k[3]) for k in index)
    derived = []
    for pair, pairing, budget, seed in cells:
        names = candidates(budget != "all", pairing == "paired")
        found = {}
        for name in names:
            hit = index.get((pair, pairing, budget, seed, name))
            hit = hit or index.get((pair, "unpaired", budget, seed, name))
            if hit is not None and (hit["pairing"] == pairing or name != "hinton_kd"):
                found[name] = hit
        if len(found) < len(names):
            continue
        scores = {name: found[name]["val_accuracy"] for name in names}
        chosen = choose(scores, {n: r.get("classes_predicted", 0) for n, r in found.items()})
        derived.append(
            {
                **found[chosen],
                "pairing": pairing,
                "method": "auto",
                "chosen": chosen,
                "candidates_val": scores,
                "seconds": sum(r["seconds"] for r in found.values()),
            }
        )
    return records + derived


def _paired_delta(a: pd.Series, b: pd.Series) -> tuple[float, float | None]:
    """Mean of ``a - b`` over seeds and the paired t-test p-value (None below 2 seeds)."""
    joined = pd.concat([a, b], axis=1, join="inner").dropna()
    if joined.empty:
        return float("nan"), None
    delta = float((joined.iloc[:, 0] - joined.iloc[:, 1]).mean())
    if len(joined) < 2 or np.allclose(joined.iloc[:, 0], joined.iloc[:, 1]):
        return delta, None
    return delta, float(stats.ttest_rel(joined.iloc[:, 0], joined.iloc[:, 1]).pvalue)


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(records: list[dict]) -> list[dict]:
    """One row per (pair, pairing, budget, method, control), ``auto`` included (see
    :func:`with_auto`): mean and std over seeds, the paired gains of :data:`GAINS` (``nan``
    where the grid has no such run; control rows get only the gain over ``ce``), the paper's two
    alignment quantities and seconds per run; ``auto`` rows also count what it chose."""
    df = pd.DataFrame(with_auto(records))
    keys = ["pair", "pairing", "budget", "method", "control", "seed"]
    acc = df.set_index(keys)["test_accuracy"].sort_index()
    present = set(acc.index.droplevel("seed"))

    def series(pair, pairing, budget, method, control) -> pd.Series:
        key = (pair, pairing, budget, method, control)
        return acc.loc[key] if key in present else pd.Series(dtype=float)

    rows = []
    keys = ["pair", "pairing", "budget", "method", "control"]
    for (pair, pairing, budget, method, control), group in df.groupby(keys, sort=False):
        mine = group.set_index("seed")["test_accuracy"]
        refs = {
            "gain_over_ce": series(pair, "unpaired", budget, "ce", ""),
            "gain_over_fixmatch": series(pair, "unpaired", budget, "fixmatch", ""),
            "gain_over_shuffled": series(pair, pairing, budget, method, "shuffled"),
            "gain_over_random_prototypes": series(
                pair, pairing, budget, method, "random_prototypes"
            ),
        }
        row = {
            "pair": pair,
            "pairing": pairing,
            "budget": budget,
            "method": method,
            "control": control,
            "seeds": len(group),
            "test_accuracy_mean": float(group.test_accuracy.mean()),
            "test_accuracy_std": _std(group.test_accuracy),
            "test_macro_f1_mean": float(group.test_macro_f1.mean()),
            "test_macro_f1_std": _std(group.test_macro_f1),
            "val_accuracy_mean": float(group.val_accuracy.mean()),
        }
        for name, ref in refs.items():
            skip = len(ref) == 0 or (control and name != "gain_over_ce")
            skip = skip or (control == "" and method == GAINS[name])  # not against itself
            gain, p = (float("nan"), None) if skip else _paired_delta(mine, ref)
            row[name], row["p_" + name.removeprefix("gain_")] = gain, p
        row["fa_distance"] = float(group.fa_distance.mean())
        row["la_distance"] = float(group.la_distance.mean())
        row["seconds_per_run"] = float(group.seconds.mean())
        if method == "auto":
            row["chosen"] = group.chosen.value_counts().to_dict()
        rows.append(row)
    return rows


def _pts(value: float, p: float | None) -> str:
    if value != value:  # NaN: no comparison for this row
        return "-"
    return f"{100 * value:+.2f}" + (f" (p={p:.2f})" if p is not None else "")


def _name(row: dict) -> str:
    return row["method"] + (f" [{row['control']}]" if row["control"] else "")


def markdown_table(rows: list[dict]) -> str:
    """The summary as a markdown table (accuracies in %, gains in points)."""
    head = (
        "| pair | pairing | labels/class | method [control] | test acc % | macro-F1 % "
        "| vs ce (pts) | vs fixmatch | vs shuffled | vs random prototypes | FA dist | LA dist "
        "| s/run |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['pair']} | {r['pairing']} | {r['budget']} | {_name(r)} "
        f"| {100 * r['test_accuracy_mean']:.2f} ± {100 * r['test_accuracy_std']:.2f} "
        f"| {100 * r['test_macro_f1_mean']:.2f} ± {100 * r['test_macro_f1_std']:.2f} "
        + "".join(
            f"| {_pts(r[g], r['p_' + g.removeprefix('gain_')])} "
            for g in ("gain_over_ce", "gain_over_fixmatch", "gain_over_shuffled")
        )
        + f"| {_pts(r['gain_over_random_prototypes'], r['p_over_random_prototypes'])} "
        f"| {r['fa_distance']:.3f} | {r['la_distance']:.3f} | {r['seconds_per_run']:.1f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


HEADLINE_GAINS = ("gain_over_ce", "gain_over_fixmatch", "gain_over_shuffled")
SHORT = {
    "gain_over_ce": "ce",
    "gain_over_fixmatch": "fixmatch",
    "gain_over_shuffled": "shuffled",
    "gain_over_random_prototypes": "random prototypes",
}


def headline_table(
    rows: list[dict],
    methods: tuple[str, ...] = ("sinkhorn_ssl", "hinton_kd", "auto"),
    gains: tuple[str, ...] = HEADLINE_GAINS,
) -> str:
    """One line per (pair, pairing, budget): the CE-only accuracy, then for each of
    ``methods`` its accuracy and its ``gains`` (points, paired over seeds); ``-`` where the
    grid has no such run."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if not r["control"]:
            cells.setdefault((r["pair"], r["pairing"], r["budget"]), {})[r["method"]] = r
    ce_acc = {(p, b): r["ce"] for (p, _, b), r in cells.items() if "ce" in r}
    head = "| pair | pairing | labels/class | ce acc % |" + "".join(
        f" {m} acc % |" + "".join(f" {m} vs {SHORT[g]} |" for g in gains) for m in methods
    )
    lines = [head, "|" + "---|" * (4 + (1 + len(gains)) * len(methods))]
    for (pair, pairing, budget), by_method in cells.items():
        ce = ce_acc.get((pair, budget))
        line = f"| {pair} | {pairing} | {budget} | "
        line += f"{100 * ce['test_accuracy_mean']:.2f} |" if ce else "- |"
        for m in methods:
            r = by_method.get(m)
            line += " - |" if r is None else f" {100 * r['test_accuracy_mean']:.2f} |"
            for g in gains:
                line += (
                    " - |" if r is None else f" {_pts(r[g], r['p_' + g.removeprefix('gain_')])} |"
                )
        lines.append(line)
    return "\n".join(lines) + "\n"


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def geometry_table(records: list[dict]) -> str:
    """Per pair, the class-similarity diagnostic (:mod:`cmkd_core.align.similarity`) beside
    the paper's two alignment quantities, all from the CE-only students of the largest labelled
    budget in ``records`` (mean ± std over seeds; the p-value is the largest of them)."""
    df = pd.DataFrame([r for r in records if "similarity_r" in r and r["method"] == "ce"])
    lines = [
        "| pair | labels/class | class-similarity r (teacher vs CE student) | p (max) "
        "| FA dist | LA dist |",
        "|---|---|---|---|---|---|",
    ]
    if df.empty:
        return "\n".join(lines) + "\n"
    order = {b: (b == "all", b if b != "all" else 0) for b in df.budget.unique()}
    for pair, group in df.groupby("pair", sort=False):
        budget = max(group.budget.unique(), key=lambda b: order[b])
        g = group[group.budget == budget]
        lines.append(
            f"| {pair} | {budget} | {g.similarity_r.mean():+.2f} ± {_std(g.similarity_r):.2f} "
            f"| {_p(g.similarity_p.max())} | {g.fa_distance.mean():.3f} "
            f"| {g.la_distance.mean():.3f} |"
        )
    return "\n".join(lines) + "\n"


def unseen_rows(records: list[dict]) -> list[dict]:
    """For runs with classes that had no label: one row per (pair, pairing, budget, method,
    control), ``auto`` included, with the mean and std over seeds of the test accuracy on the
    labelled classes, on the unlabelled ones and of their harmonic mean H."""
    df = pd.DataFrame([r for r in with_auto(records) if "test_h" in r])
    if df.empty:
        return []
    rows = []
    keys = ["pair", "pairing", "budget", "method", "control"]
    for key, group in df.groupby(keys, sort=False):
        row = dict(zip(keys, key, strict=True)) | {"seeds": len(group)}
        for name in ("accuracy_labelled_classes", "accuracy_unlabelled_classes", "h"):
            row[f"{name}_mean"] = float(group[f"test_{name}"].mean())
            row[f"{name}_std"] = _std(group[f"test_{name}"])
        rows.append(row)
    return rows


def unseen_table(rows: list[dict]) -> str:
    """:func:`unseen_rows` as a markdown table (percent, mean +- std over seeds)."""
    if not rows:
        return ""
    lines = [
        "Classes without labels: test accuracy on the labelled classes, on the unlabelled "
        "ones, and their harmonic mean H (percent, mean +- std over seeds)",
        "",
        "| pair | pairing | budget | method | control | seeds | labelled | unlabelled | H |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{100 * r[f'{n}_mean']:.1f} +- {100 * r[f'{n}_std']:.1f}"
            for n in ("accuracy_labelled_classes", "accuracy_unlabelled_classes", "h")
        ]
        head = [r["pair"], r["pairing"], r["budget"], r["method"], r["control"] or "-"]
        lines.append("| " + " | ".join(map(str, [*head, r["seeds"], *cells])) + " |")
    return "\n".join(lines) + "\n"


def outlook_table(teachers: dict[str, dict]) -> str:
    """The check before training of each pair that had one (``teachers[pair]["outlook"]``, from
    :func:`cmkd_core.benchmark.plan.grid_outlook`) as a markdown table; ``""`` when none had."""
    rows = [(pair, facts["outlook"]) for pair, facts in teachers.items() if "outlook" in facts]
    if not rows:
        return ""
    lines = [
        "Before training: the teacher's class similarities against the raw inputs' over the "
        "labelled classes (cmkd_core/align/outlook.py)",
        "",
        "| pair | r (mean over draws) | r per draw | verdict |",
        "|---|---|---|---|",
    ]
    for pair, found in rows:
        each = ", ".join(f"{v:+.2f}" for v in found["r"].values())
        lines.append(f"| {pair} | {found['r_mean']:+.2f} | {each} | {found['verdict']} |")
    return "\n".join(lines) + "\n"

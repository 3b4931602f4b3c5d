"""The benchmark's controls and statistics (on synthetic records; the real grid is a bench)."""

from __future__ import annotations

import pytest
import torch

from cmkd_core.bank import TeacherBank
from cmkd_core.benchmark.plan import shuffled_bank
from cmkd_core.benchmark.summary import headline_table, markdown_table, summarise


def test_shuffled_teacher_moves_every_class_and_its_head_with_it():
    gen = torch.Generator().manual_seed(0)
    bank = TeacherBank(
        features=torch.randn(30, 6, generator=gen),
        labels=torch.arange(30) % 3,
        splits=torch.zeros(30, dtype=torch.long),
        head_weight=torch.randn(3, 6, generator=gen),
        head_bias=torch.randn(3, generator=gen),
        classes=("a", "b", "c"),
    )
    control = shuffled_bank(bank)
    assert (control.labels != bank.labels).all()
    assert torch.equal(control.labels, (bank.labels + 1) % 3)
    # The head's verdict moves with the labels: what predicted c now predicts c + 1.
    before = bank.head()(bank.features).argmax(1)
    after = control.head()(control.features).argmax(1)
    assert torch.equal(after, (before + 1) % 3)


def _record(method, seed, acc, control=""):
    return {
        "pair": "p",
        "pairing": "unpaired",
        "budget": 5,
        "seed": seed,
        "method": method,
        "control": control,
        "test_accuracy": acc,
        "test_macro_f1": acc,
        "val_accuracy": acc,
        "best_epoch": 1,
        "seconds": 1.0,
        "fa_distance": 0.5,
        "la_distance": 0.5,
    }


def test_summary_reports_mean_std_and_paired_gains():
    records = [_record("ce", s, a) for s, a in enumerate([0.60, 0.62, 0.64])]
    records += [_record("joint", s, a) for s, a in enumerate([0.65, 0.66, 0.70])]
    records += [_record("joint", s, a, "shuffled") for s, a in enumerate([0.64, 0.66, 0.69])]
    summary = summarise(records)
    rows = {r["method"]: r for r in summary if not r["control"]}
    control = next(r for r in summary if r["control"] == "shuffled")
    assert control["method"] == "joint" and control["test_accuracy_mean"] == pytest.approx(
        0.6633333
    )
    assert (
        control["gain_over_ce"] == pytest.approx(0.0433333) and control["gain_over_shuffled"] != 0
    )
    joint = rows["joint"]
    assert joint["test_accuracy_mean"] == pytest.approx(0.67)
    assert joint["test_accuracy_std"] == pytest.approx(0.0264575, abs=1e-6)
    assert joint["gain_over_ce"] == pytest.approx(0.05)
    assert joint["gain_over_shuffled"] == pytest.approx(0.00666667, abs=1e-6)
    assert 0 < joint["p_over_ce"] < 0.05
    assert rows["ce"]["gain_over_ce"] != rows["ce"]["gain_over_ce"]  # NaN: not against itself
    assert rows["ce"]["p_over_ce"] is None
    table = markdown_table(list(rows.values()))
    assert "| p | unpaired | 5 | joint | 67.00 ± 2.65 |" in table
    assert "+0.67" in table and "+5.00 (p=" in table


def test_headline_puts_each_cell_on_one_line_with_both_gains():
    records = [_record("ce", s, a) for s, a in enumerate([0.60, 0.62, 0.64])]
    records += [_record("la", s, a) for s, a in enumerate([0.63, 0.66, 0.66])]
    records += [_record("la", s, a, "shuffled") for s, a in enumerate([0.62, 0.63, 0.65])]
    table = headline_table(summarise(records), methods=("fa", "la"))
    line = table.splitlines()[2]
    assert line.startswith("| p | unpaired | 5 | 62.00 | - | - | - | - | 65.00 | +3.00 (p=")
    assert line.endswith("| - | +1.67 (p=0.13) |") and len(table.splitlines()) == 3


def test_auto_is_derived_from_its_candidates_by_validation_accuracy():
    val = {
        "ce": [0.7, 0.8],
        "joint": [0.9, 0.8],
        "joint_w0.1": [0.6, 0.8],
        "sinkhorn_ssl": [0.5, 0.8],
    }
    test = {
        "ce": [0.1, 0.2],
        "joint": [0.3, 0.4],
        "joint_w0.1": [0.5, 0.6],
        "sinkhorn_ssl": [0.7, 0.8],
    }
    records = []
    for method in val:
        for seed in (0, 1):
            record = _record(method, seed, test[method][seed])
            records.append({**record, "val_accuracy": val[method][seed]})
    rows = {r["method"]: r for r in summarise(records)}
    auto = rows["auto"]
    # seed 0: joint has the best val (0.9), its test 0.3; seed 1: a tie, which goes to ce (0.2)
    assert auto["test_accuracy_mean"] == pytest.approx(0.25)
    assert auto["chosen"] == {"joint": 1, "ce": 1}
    assert auto["gain_over_ce"] == pytest.approx(0.1)
    # A cell that lacks a candidate gets no auto row.
    partial = [r for r in records if r["method"] != "sinkhorn_ssl"]
    assert "auto" not in {r["method"] for r in summarise(partial)}

"""bench/distill.py times methods in interleaved rounds: every method warms up first, the order
rotates each round, and ratios are taken within a round."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def distill_bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("distill")
    finally:
        sys.path.remove(str(BENCH))


class _Runner:
    def __init__(self, name: str, log: list, seconds: float):
        self.name, self.log, self.seconds = name, log, seconds

    def steps(self, n: int) -> list[float]:
        self.log.append((self.name, n))
        return [self.seconds] * n


def test_rounds_rotate_the_order_after_a_shared_warm_up(distill_bench):
    log: list = []
    runners = [_Runner("ce", log, 1.0), _Runner("joint", log, 2.0), _Runner("ssl", log, 3.0)]
    found = distill_bench.interleaved(runners, rounds=3, steps=4, warmup=2)
    assert log[:3] == [("ce", 2), ("joint", 2), ("ssl", 2)]
    order = [name for name, _ in log[3:]]
    assert order == ["ce", "joint", "ssl", "joint", "ssl", "ce", "ssl", "ce", "joint"]
    assert found["per_round"]["joint"] == [2.0, 2.0, 2.0] and len(found["times"]["ce"]) == 12


def test_the_ratio_is_the_median_over_rounds_of_same_round_ratios(distill_bench):
    # a slow first round for the baseline alone (a process warming up) moves one ratio only
    facts = distill_bench.ratio_facts([2.0, 2.0, 2.2, 2.0], [2.0, 1.0, 1.0, 1.0])
    assert facts == {"ratio_to_ce": 2.0, "ratio_low": 1.0, "ratio_high": 2.2}

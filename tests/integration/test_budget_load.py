"""Budget agreement under concurrent load: benchmarks.budget_load at a small size.

Real party processes; 200 queries from 2 analyst processes x 4 threads against budgets that
hold 50 of them. The full-size run (1,000 queries, 4 x 8) is `python -m
benchmarks.budget_load`; its numbers are in BENCHMARKS.md.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from benchmarks.budget_load import PARTIES, run

pytestmark = pytest.mark.slow


def test_ledgers_equal_the_revealed_queries_under_concurrent_load(tmp_path: Path) -> None:
    res = run(workdir=tmp_path, queries=200, processes=2, threads=4, budget="5", epsilon="0.1")
    assert res.within_budget
    assert res.ledgers_agree, (res.charged, res.revealed, res.errors)
    assert 1 <= res.revealed <= 50
    for p in PARTIES:
        assert res.charged[p] == res.revealed
        assert res.spent[p] == Fraction(res.revealed, 10)
    # the budget was exhausted, so most rounds were refused, at Propose, before any charge
    assert res.refused >= 150

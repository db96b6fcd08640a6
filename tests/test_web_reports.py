"""The console's numbers, from a real state database: per-day outcomes, weekly live accuracy (the
same rule as `mailtriage stats`), and the search's filters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailtriage.store.state import StateDB
from mailtriage.testing.builders import mail
from mailtriage.web import reports
from tests.console_fixtures import LABELS, decide

pytestmark = pytest.mark.pure


@pytest.fixture
def state(tmp_path: Path) -> StateDB:
    return StateDB(tmp_path / "state.sqlite3")


def test_weekly_accuracy_matches_stats(state: StateDB) -> None:
    keys = [decide(state, mail(f"b{i}", f"s{i}"), i, "billing", 0.9) for i in range(4)]
    decide(state, mail("u", "unsure"), 10, "login", 0.3)
    state.record_correction(keys[0], "support", "billing", "refunds", was_unsure=False)
    weeks, series = reports.weekly_accuracy(state, LABELS, 4)
    assert len(weeks) == 4 and series["billing"] == [None, None, None, pytest.approx(0.75)]
    assert series["login"] == [None] * 4  # unsure mail is not "filed": no accuracy to measure
    assert state.stats(30)["accuracy"]["billing"]["accuracy"] == pytest.approx(0.75)


def test_daily_outcomes_cover_every_day(state: StateDB) -> None:
    decide(state, mail("a", "a"), 1, "billing", 0.9)
    decide(state, mail("b", "b"), 2, "login", 0.2)
    days = reports.daily_outcomes(state, 7)
    assert len(days) == 7 and days[-1] == (time.strftime("%Y-%m-%d", time.gmtime()),
                                           {"filed": 1, "unsure": 1, "failed": 0, "quarantined": 0})
    assert all(sum(c.values()) == 0 for _, c in days[:-1])


def test_search_treats_wildcards_literally_and_pages(state: StateDB) -> None:
    decide(state, mail("a", "100% refund"), 1, "refunds", 0.9)
    decide(state, mail("b", "1000 refunds"), 2, "refunds", 0.9)
    rows, more = reports.search(state, reports.Filters(subject="100%"))
    assert [r.subject for r in rows] == ["100% refund"] and not more
    for uid in range(3, 3 + reports.PAGE_SIZE):
        decide(state, mail(f"m{uid}", f"bulk {uid}"), uid, "billing", 0.9)
    first, more = reports.search(state, reports.Filters())
    assert len(first) == reports.PAGE_SIZE and more
    second, more = reports.search(state, reports.Filters(page=2))
    assert len(second) == 2 and not more and not {r.rowid for r in first} & {r.rowid for r in second}


@pytest.mark.parametrize(("params", "message"), [
    ({"subject": "x" * 201}, "at most 200"),
    ({"outcome": "lost"}, "outcome 'lost' is unknown"),
    ({"day_to": "31/12/2026"}, "YYYY-MM-DD"),
    ({"page": "0"}, "pages start at 1"),
    ({"page": "two"}, "not a number"),
])
def test_filters_refuse_bad_input_clearly(params: dict[str, str], message: str) -> None:
    with pytest.raises(reports.QueryError, match=message):
        reports.Filters.parse(params, LABELS)

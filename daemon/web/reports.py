"""What the console's pages show, read from the state database: decisions per day, live accuracy over
time, the searchable decision list and one decision with its explanation and correction.

Read-only SQL over ``StateDB.query``; the outcome of a row is the one ``StateDB.stats`` gives it, so
the console and `mailtriage stats` never disagree.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field
from typing import Any

from mailtriage.core.explain import Explanation
from mailtriage.errors import MailtriageError
from mailtriage.store.state import StateDB

DAY = 86400
# The outcomes the Overview charts, in the order of the stacked bars (StateDB.stats' OUTCOMES, with
# quarantine_pending counted as failed: still in the source either way).
CHART_OUTCOMES = ("filed", "unsure", "failed", "quarantined")
# Longest search term accepted: longer ones are refused, not truncated, so a search never means
# something other than what was typed.
MAX_TERM = 200
PAGE_SIZE = 50

_OUTCOME_SQL = """CASE
    WHEN m.status = 'pending' THEN 'pending'
    WHEN m.quarantined = 1 AND m.status = 'done' THEN 'quarantined'
    WHEN m.quarantined = 1 AND m.retry_at IS NOT NULL THEN 'quarantine_pending'
    WHEN m.status = 'failed' THEN 'failed'
    WHEN m.dry_run = 1 THEN 'dry_run'
    WHEN m.unsure = 1 THEN 'unsure'
    ELSE 'filed' END"""
OUTCOMES = ("filed", "unsure", "dry_run", "failed", "quarantined", "quarantine_pending", "pending")


class QueryError(MailtriageError):
    """A search the console refuses (too long, a bad date, an unknown outcome); the message says why."""


@dataclass(frozen=True)
class Filters:
    """A Decisions search. Empty strings mean "any"."""

    sender: str = ""
    subject: str = ""
    category: str = ""
    outcome: str = ""
    day_from: str = ""  # YYYY-MM-DD, UTC
    day_to: str = ""
    page: int = 1

    @classmethod
    def parse(cls, params: Any, categories: tuple[str, ...]) -> Filters:
        """Validate query parameters (a mapping of str -> str); QueryError names the bad one."""
        values: dict[str, Any] = {}
        for name in ("sender", "subject", "category", "outcome", "day_from", "day_to"):
            value = str(params.get(name, "") or "").strip()
            if len(value) > MAX_TERM:
                raise QueryError(f"the {name} search is {len(value)} characters long; at most {MAX_TERM} are "
                                 "accepted: search for a shorter part of it")
            values[name] = value
        if values["category"] and values["category"] not in categories:
            raise QueryError(f"category {values['category']!r} is not configured; pick one of {list(categories)}")
        if values["outcome"] and values["outcome"] not in OUTCOMES:
            raise QueryError(f"outcome {values['outcome']!r} is unknown; pick one of {list(OUTCOMES)}")
        for name in ("day_from", "day_to"):
            if values[name]:
                _day(values[name], name)
        try:
            page = int(params.get("page", 1) or 1)
        except ValueError:
            raise QueryError(f"page {params.get('page')!r} is not a number") from None
        if not 1 <= page <= 10000:
            raise QueryError(f"page {page} is out of range: pages start at 1")
        return cls(page=page, **values)


def _day(text: str, name: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%d")))  # the day's start, UTC
    except ValueError:
        raise QueryError(f"{name} = {text!r} is not a date; write it as YYYY-MM-DD, e.g. 2026-03-31") from None


def _like(term: str) -> str:
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass(frozen=True)
class DecisionRow:
    rowid: int
    account: str
    mailbox: str
    uid: int
    key: str
    label: str | None
    confidence: float | None
    outcome: str
    folder: str | None
    model_version: str | None
    decided_at: float
    subject: str
    sender: str
    sent: str
    error: str | None
    corrected_to: str | None
    explanation: Explanation | None = field(default=None, compare=False)


def _envelopes(state: StateDB) -> bool:
    return state.has_table("envelopes")


def _select(state: StateDB) -> str:
    env = ("COALESCE(e.subject, '') AS subject, COALESCE(e.sender, '') AS sender, COALESCE(e.sent, '') AS sent"
           if _envelopes(state) else "'' AS subject, '' AS sender, '' AS sent")
    join = "LEFT JOIN envelopes e ON e.key = m.key" if _envelopes(state) else ""
    return f"""SELECT m.rowid AS rowid, m.account, m.mailbox, m.uid, m.key, m.label, m.confidence, m.folder,
        m.model_version, m.decided_at, m.error, m.explanation, {_OUTCOME_SQL} AS outcome, {env},
        (SELECT c.actual FROM corrections c WHERE c.key = m.key ORDER BY c.corrected_at DESC LIMIT 1) AS corrected_to
        FROM messages m {join}"""


def _row(r: Any) -> DecisionRow:
    why = None
    if r["explanation"]:
        try:
            why = Explanation.from_json(r["explanation"])
        except Exception:  # noqa: BLE001 - a damaged explanation hides itself, not the decision
            why = None
    return DecisionRow(r["rowid"], r["account"], r["mailbox"], r["uid"], r["key"], r["label"], r["confidence"],
                       r["outcome"], r["folder"], r["model_version"], r["decided_at"], r["subject"], r["sender"],
                       r["sent"], r["error"], r["corrected_to"], why)


def search(state: StateDB, f: Filters) -> tuple[list[DecisionRow], bool]:
    """One page of decisions matching ``f``, newest first, and whether there is a next page."""
    where = ["m.status IN ('done', 'failed', 'pending')"]
    params: list[Any] = []
    if f.sender or f.subject:
        if not _envelopes(state):
            return [], False
        for column, term in (("e.sender", f.sender), ("e.subject", f.subject)):
            if term:
                where.append(f"{column} LIKE ? ESCAPE '\\'")
                params.append(_like(term))
    if f.category:
        where.append("m.label = ?")
        params.append(f.category)
    if f.outcome:
        where.append(f"({_OUTCOME_SQL}) = ?")
        params.append(f.outcome)
    if f.day_from:
        where.append("m.decided_at >= ?")
        params.append(_day(f.day_from, "day_from"))
    if f.day_to:
        where.append("m.decided_at < ?")
        params.append(_day(f.day_to, "day_to") + DAY)
    sql = (f"{_select(state)} WHERE {' AND '.join(where)} ORDER BY m.decided_at DESC, m.rowid DESC "
           f"LIMIT {PAGE_SIZE + 1} OFFSET {(f.page - 1) * PAGE_SIZE}")
    rows = [_row(r) for r in state.query(sql, params)]
    return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE


def decision(state: StateDB, rowid: int) -> DecisionRow | None:
    rows = state.query(f"{_select(state)} WHERE m.rowid = ?", (rowid,))
    return _row(rows[0]) if rows else None


def latest_by_key(state: StateDB, keys: list[str]) -> dict[str, DecisionRow]:
    """The newest decision of each message key (Queues shows the top guesses of what it lists)."""
    out: dict[str, DecisionRow] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in state.query(f"{_select(state)} WHERE m.key IN ({marks}) AND m.status != 'skipped' "
                             "ORDER BY m.decided_at", chunk):
            out[r["key"]] = _row(r)
    return out


def daily_outcomes(state: StateDB, days: int, now: float | None = None) -> list[tuple[str, dict[str, int]]]:
    """Decisions per UTC day of the last ``days`` days by outcome, oldest first (every day listed)."""
    now = time.time() if now is None else now
    first = (int(now) // DAY - days + 1) * DAY
    out = {time.strftime("%Y-%m-%d", time.gmtime(first + i * DAY)): dict.fromkeys(CHART_OUTCOMES, 0)
           for i in range(days)}
    for r in state.query(
        f"SELECT CAST(m.decided_at / {DAY} AS INTEGER) AS d, {_OUTCOME_SQL} AS outcome, COUNT(*) AS n "
        "FROM messages m WHERE m.status IN ('done', 'failed') AND m.decided_at >= ? GROUP BY d, outcome",
        (first,),
    ):
        day = time.strftime("%Y-%m-%d", time.gmtime(r["d"] * DAY))
        outcome = "failed" if r["outcome"] == "quarantine_pending" else r["outcome"]
        if day in out and outcome in out[day]:
            out[day][outcome] += r["n"]
    return list(out.items())


def weekly_accuracy(state: StateDB, labels: tuple[str, ...], weeks: int, now: float | None = None
                    ) -> tuple[list[str], dict[str, list[float | None]]]:
    """Live accuracy per category per week (by when the message was filed): 1 - corrected / filed,
    as ``StateDB.stats`` counts it. Returns the week starts and one series per label (None: nothing filed)."""
    now = time.time() if now is None else now
    week = 7 * DAY
    first = (int(now) // DAY + 1) * DAY - weeks * week
    starts = [time.strftime("%Y-%m-%d", time.gmtime(first + i * week)) for i in range(weeks)]
    filed: dict[tuple[str, int], int] = {}
    wrong: dict[tuple[str, int], int] = {}
    for r in state.query(
        f"""SELECT m.label, CAST((m.decided_at - ?) / {week} AS INTEGER) AS w, COUNT(*) AS n,
               SUM(EXISTS (SELECT 1 FROM corrections c WHERE c.key = m.key AND c.was_unsure = 0
                           AND c.predicted = m.label)) AS wrong
            FROM messages m WHERE m.status = 'done' AND m.dry_run = 0 AND m.unsure = 0 AND m.quarantined = 0
              AND m.action != 'none' AND m.decided_at >= ? GROUP BY m.label, w""",
        (first, first),
    ):
        filed[(r["label"], r["w"])] = r["n"]
        wrong[(r["label"], r["w"])] = r["wrong"] or 0
    series = {label: [(1 - wrong[(label, i)] / filed[(label, i)]) if filed.get((label, i)) else None
                      for i in range(weeks)] for label in labels}
    return starts, series

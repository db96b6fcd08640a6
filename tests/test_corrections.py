"""Feedback path: table tests of the matching, and a real Dovecot where another client moves mail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailtriage import metrics
from mailtriage.config import Config
from mailtriage.testing.builders import account, mail, make_config
from mailtriage.testing.waits import wait_for
from mailtriage.store.corrections import Correction, FiledMessage, KeyCache, match_corrections, scan_corrections

F = FiledMessage


@pytest.mark.pure
@pytest.mark.parametrize(
    ("filed", "found", "expected"),
    [
        pytest.param([], {"billing": ["<a>"]}, [], id="nothing-filed"),
        pytest.param([F("<a>", "billing", False)], {"billing": ["<a>"]}, [], id="still-where-filed"),
        pytest.param(
            [F("<a>", "billing", False)],
            {"billing": [], "login": ["<a>"]},
            [("<a>", "billing", "login", False)],
            id="moved-to-other-category",
        ),
        pytest.param([F("<a>", "billing", False)], {"login": []}, [], id="gone-from-all-category-folders"),
        pytest.param(
            [F("<a>", "billing", False)], {"billing": ["<a>"], "login": ["<a>"]}, [], id="copied-keeps-label"
        ),
        pytest.param(
            [F("<a>", "billing", False)], {"login": ["<a>"], "refunds": ["<a>"]}, [], id="ambiguous-two-others"
        ),
        pytest.param(
            [F("<u>", "login", True)],
            {"billing": ["<u>"]},
            [("<u>", "login", "billing", True)],
            id="sorted-out-of-unsure",
        ),
        pytest.param(
            [F("<u>", "login", True)],
            {"login": ["<u>"]},
            [("<u>", "login", "login", True)],
            id="unsure-confirmed-is-a-labelled-example",
        ),
        pytest.param([F("<x>", "login", False)], {"billing": ["<other>"]}, [], id="unknown-messages-ignored"),
        pytest.param(
            [F("<a>", "billing", False), F("<a>", "billing", False)],
            {"login": ["<a>"]},
            [("<a>", "billing", "login", False)],
            id="duplicate-rows-judged-once",
        ),
        pytest.param(
            [F("<a>", "billing", False), F("<b>", "login", False), F("<c>", "refunds", True)],
            {"billing": ["<b>"], "login": ["<a>"], "refunds": ["<c>"]},
            [("<a>", "billing", "login", False), ("<b>", "login", "billing", False), ("<c>", "refunds", "refunds", True)],
            id="several",
        ),
    ],
)
def test_match_corrections(
    filed: list[FiledMessage], found: dict[str, list[str]], expected: list[tuple[str, str, str, bool]]
) -> None:
    got = match_corrections("acct", filed, found)
    assert got == [Correction(k, "acct", p, a, u) for k, p, a, u in expected]


# -- against a real Dovecot ------------------------------------------------------------------

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}


def _mail(n: int, mid: bool = True) -> bytes:
    return mail(f"Hello, this is question number {n}.\n", f"question {n}", sender=f"customer{n}@example.com",
                date="Mon, 02 Mar 2026 10:00:00 +0000", message_id=f"<m{n}@example.com>" if mid else "", linesep="\n")


def _config(dovecot: Any, user: str, password: str, tmp_path: Path) -> Config:
    imap = account(host=dovecot.host, port=dovecot.port, username=user, password=password, secret_dir=tmp_path)
    return make_config(tmp_path, categories=CATEGORIES, unsure_folder="Support/Unsure", accounts=[imap])


@pytest.mark.component
def test_scan_finds_move_by_another_client(dovecot: Any, imap_user: tuple[str, str], tmp_path: Path) -> None:
    from imapclient import IMAPClient

    from mailtriage.imap.connection import connect
    from mailtriage.core.mailtext import message_key
    from mailtriage.core.routing import Decision
    from mailtriage.store.state import StateDB
    from mailtriage.testing.dovecot import load_messages

    user, password = imap_user
    config = _config(dovecot, user, password, tmp_path)
    state = StateDB(config.state_path)
    raws = {n: _mail(n, mid=(n != 3)) for n in (1, 2, 3, 4)}
    # What the daemon did: 1 -> billing, 2 -> login, 3 (no Message-ID) -> billing, 4 -> unsure.
    placed = {1: "billing", 2: "login", 3: "billing", 4: None}
    client: IMAPClient = dovecot.client(user, password)
    try:
        for n, label in placed.items():
            folder = CATEGORIES[label] if label else config.unsure_folder
            (uid,) = load_messages(client, folder, [raws[n]])
            decision = Decision(label or "refunds", 0.9 if label else 0.3, label is None, folder)
            state.record_decision(
                "support", "INBOX", 1, n, message_key(raws[n]), decision, "move", "v1", False, "done"
            )
        for folder in (*CATEGORIES.values(), config.unsure_folder):
            if not client.folder_exists(folder):
                client.create_folder(folder)
    finally:
        client.logout()

    cache = KeyCache()
    assert scan_corrections(connect, config, state, cache) == []

    # Staff, in their own mail client: 1 billing -> refunds, 3 billing -> login, 4 unsure -> billing.
    staff: IMAPClient = dovecot.client(user, password)
    try:
        staff.select_folder(CATEGORIES["billing"])
        by_subject = {
            data[b"ENVELOPE"].subject.decode(): uid
            for uid, data in staff.fetch(staff.search(["ALL"]), [b"ENVELOPE"]).items()
        }
        staff.move([by_subject["question 1"]], CATEGORIES["refunds"])
        staff.move([by_subject["question 3"]], CATEGORIES["login"])
        staff.select_folder(config.unsure_folder)
        staff.move(staff.search(["ALL"]), CATEGORIES["billing"])
    finally:
        staff.logout()

    before = metrics.CORRECTIONS.labels(predicted="billing", actual="refunds")._value.get()
    found = scan_corrections(connect, config, state, cache)
    assert sorted((c.key, c.predicted, c.actual, c.was_unsure) for c in found) == sorted(
        [
            (message_key(raws[1]), "billing", "refunds", False),
            (message_key(raws[3]), "billing", "login", False),
            (message_key(raws[4]), "refunds", "billing", True),
        ]
    )
    assert metrics.CORRECTIONS.labels(predicted="billing", actual="refunds")._value.get() == before + 1
    # Recorded once: a second scan finds nothing new, and stats count them.
    assert scan_corrections(connect, config, state, cache) == []
    stats = state.stats(30)
    assert stats["corrections"]["total"] == 3
    assert stats["corrections"]["from_unsure"] == 1


@pytest.mark.component
def test_moving_mail_the_smtp_filter_tagged_is_a_correction(dovecot: Any, imap_user: tuple[str, str], tmp_path: Path) -> None:
    """Relayed mail lands in the mailbox; staff moving it corrects the SMTP decision,
    found by the periodic scan and by the IMAPSieve hook (learn_moved)."""
    from mailtriage.imap.connection import connect
    from mailtriage.core.mailtext import message_key
    from mailtriage.core.routing import Decision
    from mailtriage.store.corrections import learn_moved
    from mailtriage.store.state import SMTP_INTAKE, StateDB
    from mailtriage.testing.dovecot import load_messages

    user, password = imap_user
    config = _config(dovecot, user, password, tmp_path)
    state = StateDB(config.state_path)
    one, two = _mail(21), _mail(22)
    for raw in (one, two):  # what the relay recorded: both tagged billing
        state.record_relayed(message_key(raw), Decision("billing", 0.9, False, CATEGORIES["billing"]), "v1")
    assert [(r.account, r.uid) for r in state.rows()] == [(SMTP_INTAKE, 1), (SMTP_INTAKE, 2)]
    client = dovecot.client(user, password)
    try:
        for folder in (*CATEGORIES.values(), config.unsure_folder):
            if not client.folder_exists(folder):
                client.create_folder(folder)
        load_messages(client, CATEGORIES["refunds"], [one])  # staff filed it under refunds
    finally:
        client.logout()
    found = scan_corrections(connect, config, state, KeyCache())
    assert [(c.key, c.predicted, c.actual) for c in found] == [(message_key(one), "billing", "refunds")]
    corr = learn_moved(state, config, config.accounts[0], CATEGORIES["login"], two)
    assert corr is not None and (corr.predicted, corr.actual) == ("billing", "login")
    assert state.stats(30)["intakes"] == {"imap": 0, "smtp": 2, "milter": 0}


@pytest.mark.component
def test_scan_skips_unreachable_account(tmp_path: Path) -> None:
    import socket

    from mailtriage.imap.connection import connect
    from mailtriage.store.state import StateDB

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = account("gone", port=port, username="u", password="x", secret_dir=tmp_path)
    config = make_config(categories=CATEGORIES, state_path=str(tmp_path / "s.db"), accounts=[gone])
    assert scan_corrections(connect, config, StateDB(config.state_path)) == []


# -- mailtriage stats over the same state ------------------------------------------------------


def _decide(state: Any, uid: int, key: str, label: str, unsure: bool = False, dry_run: bool = False) -> None:
    from mailtriage.core.routing import Decision

    folder = "Support/Unsure" if unsure else CATEGORIES[label]
    state.record_decision(
        "support", "INBOX", 1, uid, key, Decision(label, 0.4 if unsure else 0.9, unsure, folder),
        "move", "v1", dry_run, "done",
    )


@pytest.mark.pure
def test_stats_table_and_json(tmp_path: Path) -> None:
    import io
    import json

    from mailtriage.store.state import StateDB
    from mailtriage.store.stats import print_stats

    config = make_config(tmp_path, categories=CATEGORIES, model={"path": str(tmp_path / "none")})
    state = StateDB(config.state_path)
    for uid, (label, unsure) in enumerate(
        [("billing", False), ("billing", False), ("billing", False), ("billing", False), ("login", False), ("refunds", True)],
        start=1,
    ):
        _decide(state, uid, f"<k{uid}>", label, unsure)
    _decide(state, 7, "<k7>", "login", dry_run=True)
    state.record_correction("<k1>", "support", "billing", "refunds", False)
    state.record_correction("<k6>", "support", "refunds", "login", True)

    out = io.StringIO()
    assert print_stats(config, window_days=30, as_json=True, out=out) == 0
    data = json.loads(out.getvalue())
    assert data["totals"]["filed"] == 5 and data["totals"]["unsure"] == 1 and data["totals"]["dry_run"] == 1
    assert data["accuracy"]["billing"]["accuracy"] == pytest.approx(0.75)
    assert data["corrections"]["total"] == 2 and data["corrections"]["from_unsure"] == 1
    # No model at model.path: every example counts. 5 filed (1 of them corrected) + 1 out of unsure.
    assert data["next_retrain"] == {
        "since": None, "corrections": 1, "from_unsure": 1, "filed_unchanged": 4, "total": 6,
    }

    out = io.StringIO()
    assert print_stats(config, window_days=30, out=out) == 0
    text = out.getvalue()
    assert "billing" in text and "75.0%" in text
    assert "Next retrain: 6 new labelled example(s)" in text


@pytest.mark.pure
def test_stats_without_state_db_creates_nothing(tmp_path: Path) -> None:
    import io

    from mailtriage.store.stats import print_stats

    config = make_config(tmp_path / "missing", categories=CATEGORIES)
    out = io.StringIO()
    assert print_stats(config, out=out) == 0
    assert "no state database yet" in out.getvalue()
    assert not (tmp_path / "missing").exists()


@pytest.mark.pure
def test_next_retrain_counts_only_since_model_creation(tmp_path: Path) -> None:
    import time

    from mailtriage.store.state import StateDB
    from mailtriage.store.stats import next_retrain_examples

    state = StateDB(tmp_path / "s.db")
    _decide(state, 1, "<old>", "billing")
    cutoff = time.time() + 0.001
    wait_for(lambda: time.time() > cutoff, interval=0.001)  # the next decision is stamped after the cutoff
    _decide(state, 2, "<new>", "login")
    assert next_retrain_examples(state, cutoff)["total"] == 1
    assert next_retrain_examples(state, None)["total"] == 2

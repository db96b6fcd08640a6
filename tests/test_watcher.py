"""The watcher against a real Dovecot: every message filed exactly once, whatever happens —
IDLE and polling, backlog batches, each action, dry runs, restarts, renumbering, crashes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from imapclient import DELETED, SEEN, IMAPClient

from mailtriage.imap import actions

from mailtriage.imap import connection
from mailtriage.config import AccountConfig, Config
from mailtriage.errors import MailboxError
from mailtriage.store.state import StateDB
from mailtriage.imap.watcher import MailboxWatcher
from mailtriage.testing.dovecot import NO_IDLE, NO_MOVE, Dovecot, load_messages
from mailtriage.testing.builders import account, mail, make_config
from mailtriage.testing.fakes import KeywordClassifier
from mailtriage.testing.waits import wait_for

pytestmark = pytest.mark.component

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
UNSURE_FOLDER = "Support/Unsure"
ALL_FOLDERS = [*CATEGORIES.values(), UNSURE_FOLDER]
_WORDS = {"invoice": "billing", "password": "login", "refund": "refunds"}
_DATE = "Mon, 6 May 2024 07:08:09 +0200"


def fake_classifier() -> KeywordClassifier:
    """Keyword rules instead of a model (pure logic); anything without a keyword is unsure."""
    return KeywordClassifier(tuple(CATEGORIES), _WORDS, version="fake-v1", default="billing")


def msg(n: int, subject: str, mid: str | None = None) -> bytes:
    """Customer n's message; the Message-ID follows from n and the subject's first word unless given."""
    return mail(f"Hello, {subject}.", subject, sender=f"Customer {n} <c{n}@example.com>", date=_DATE,
                message_id=mid or f"<msg-{n}-{subject.split()[0].lower()}@example.com>")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, categories=CATEGORIES, unsure_folder=UNSURE_FOLDER, model={"threshold": 0.6})


@pytest.fixture
def make_account(tmp_path: Path) -> Callable[..., AccountConfig]:
    def make(server: Dovecot, user: str, password: str, **kw: Any) -> AccountConfig:
        fields: dict[str, Any] = {"host": server.host, "port": server.port, "idle_timeout": 30, "poll_interval": 1,
                                  "fetch_batch": 3, "reconnect_max": 1, **kw}
        return AccountConfig(**account("acct", username=user, password=password, secret_dir=tmp_path, **fields))

    return make


@pytest.fixture
def user(dovecot: Dovecot, imap_user: tuple[str, str]) -> Iterator[tuple[str, str, IMAPClient]]:
    """A fresh user with the category folders, and a second connection to feed and inspect it."""
    name, password = imap_user
    client = dovecot.client(name, password)
    for folder in ALL_FOLDERS:
        client.create_folder(folder)
    try:
        yield name, password, client
    finally:
        connection.close(client)


def contents(client: IMAPClient, folder: str) -> dict[int, dict[bytes, Any]]:
    """uid -> {FLAGS (without \\Recent), BODY[HEADER.FIELDS (MESSAGE-ID SUBJECT)]} of a folder."""
    client.select_folder(folder, readonly=True)
    uids = client.search(["ALL"])
    if not uids:
        return {}
    data = client.fetch(uids, ["FLAGS", "BODY.PEEK[HEADER]"])
    return {
        u: {"flags": set(d[b"FLAGS"]) - {b"\\Recent"}, "header": d[b"BODY[HEADER]"]} for u, d in data.items()
    }


def count_where(client: IMAPClient) -> dict[str, int]:
    return {f: len(contents(client, f)) for f in ["INBOX", *ALL_FOLDERS]}


def backlog_until(w: MailboxWatcher, pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Backlog passes until ``pred()`` holds or the deadline passes (retries are due by the clock)."""
    return wait_for(lambda: w.process_backlog() is not None and pred(), timeout)


def watcher_for(account: AccountConfig, config: Config, path: str | None = None, **kw: Any) -> tuple[MailboxWatcher, KeywordClassifier]:
    clf = fake_classifier()
    w = MailboxWatcher(account, "INBOX", config, StateDB(path or config.state_path), clf, idle_slice=0.2, backoff_start=0.1, **kw)
    return w, clf


MIXED = [msg(1, "Invoice 1 wrong"), msg(2, "Password reset"), msg(3, "Refund please"), msg(4, "Just saying hi"),
         msg(5, "Invoice 5 again"), msg(6, "Refund status"), msg(7, "Password expired")]


# ---- catch-up and actions --------------------------------------------------------------------


def test_backlog_moves_each_message_once_in_batches(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    name, password, client = user
    load_messages(client, "INBOX", MIXED)
    w, clf = watcher_for(make_account(dovecot, name, password, fetch_batch=3), config)
    try:
        assert w.process_backlog() == 7
        assert clf.batches == [3, 3, 1]
        assert count_where(client) == {"INBOX": 0, "Support/Billing": 2, "Support/Login": 2, "Support/Refunds": 2,
                                       "Support/Unsure": 1}
        assert all(SEEN not in m["flags"] for f in ALL_FOLDERS for m in contents(client, f).values())
        assert b"hi" in next(iter(contents(client, UNSURE_FOLDER).values()))["header"]
        rows = w.state.rows("acct")
        assert [r.status for r in rows] == ["done"] * 7 and {r.model_version for r in rows} == {"fake-v1"}
        assert w.process_backlog() == 0
        stats = w.state.stats()
        assert stats["totals"]["filed"] == 6 and stats["totals"]["unsure"] == 1
    finally:
        w.close()


def test_keyword_action_tags_in_place(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice 1"), msg(2, "Hello there")], flags=[b"$seenbefore"])
    w, _ = watcher_for(make_account(dovecot, name, password, action="keyword", keyword_prefix="mt_"), config)
    try:
        assert w.process_backlog() == 2
    finally:
        w.close()
    inbox = contents(client, "INBOX")
    assert sorted(tuple(sorted(m["flags"])) for m in inbox.values()) == [
        (b"$seenbefore", b"mt_billing"), (b"$seenbefore", b"mt_unsure")]
    assert count_where(client)["Support/Billing"] == 0
    filed = w.state.filed("acct")
    assert {r.folder for r in filed} == {"INBOX"} and {r.unsure for r in filed} == {False, True}


def test_header_action_appends_tagged_copy_and_removes_original(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    name, password, client = user
    forged = msg(1, "Invoice 1").replace(b"Subject:", b"X-Mailtriage-Category: refunds\r\nSubject:")
    load_messages(client, "INBOX", [forged, msg(2, "Hello there")], flags=[SEEN])
    client.normalise_times = False
    client.select_folder("INBOX", readonly=True)
    dates = {d[b"BODY[HEADER.FIELDS (SUBJECT)]"]: d[b"INTERNALDATE"]
             for d in client.fetch(client.search(["ALL"]), ["INTERNALDATE", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"]).values()}
    w, _ = watcher_for(make_account(dovecot, name, password, action="header"), config)
    try:
        assert w.process_backlog() == 2
    finally:
        w.close()
    assert count_where(client) == {"INBOX": 0, "Support/Billing": 1, "Support/Login": 0, "Support/Refunds": 0,
                                   "Support/Unsure": 1}
    (billing,) = contents(client, "Support/Billing").values()
    assert billing["header"].startswith(b"X-Mailtriage-Category: billing\r\nX-Mailtriage-Confidence: 0.9500\r\n")
    assert b"refunds" not in billing["header"]  # the sender's forged header is gone
    assert billing["flags"] == {SEEN}
    (unsure,) = contents(client, UNSURE_FOLDER).values()
    assert unsure["header"].startswith(b"X-Mailtriage-Category: unsure\r\n")
    for folder in ("Support/Billing", UNSURE_FOLDER):
        client.select_folder(folder, readonly=True)
        for d in client.fetch(client.search(["ALL"]), ["INTERNALDATE", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"]).values():
            assert d[b"INTERNALDATE"] == dates[d[b"BODY[HEADER.FIELDS (SUBJECT)]"]]


def test_header_action_leaves_a_message_over_max_message_bytes_whole_in_place(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """The client keeps at most max_message_bytes of a message, so the header action
    must not rewrite a larger one (its copy would be cut): the original stays, recorded as failed."""
    name, password, client = user
    big = msg(1, "Invoice huge").replace(b"\r\n\r\nHello", b"\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1500 + b"Hello")
    load_messages(client, "INBOX", [big, msg(2, "Invoice small")])
    w, _ = watcher_for(make_account(dovecot, name, password, action="header", max_message_bytes=1 << 20), config)
    try:
        w.process_backlog()
    finally:
        w.close()
    where = count_where(client)
    assert where["INBOX"] == 1 and where["Support/Billing"] == 1, where
    client.select_folder("INBOX", readonly=True)
    (uid,) = client.search(["ALL"])
    assert client.fetch([uid], ["RFC822.SIZE"])[uid][b"RFC822.SIZE"] == len(big)  # the original, whole
    failed = [r for r in StateDB(config.state_path).rows() if r.status == "failed"]
    assert len(failed) == 1 and "max_message_bytes" in (failed[0].error or "")


def test_byte_groups_bound_each_fetch() -> None:
    from mailtriage.imap.filing import byte_groups

    sizes = {1: 10, 2: 600, 3: 600, 4: 5000, 5: 10, 6: 10}
    # cap 1000 per message (a partial fetch), budget 1000 per FETCH: 4 counts as 1000, alone.
    assert byte_groups([1, 2, 3, 4, 5, 6], sizes, 1000, 1000) == [[1, 2], [3], [4], [5, 6]]
    assert byte_groups([1, 5, 6], sizes, 1000, 1000) == [[1, 5, 6]]  # small mail: one FETCH
    assert byte_groups([], sizes, 1000, 1000) == []


def test_a_backlog_of_big_messages_is_fetched_a_few_at_a_time(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """Fetch_batch messages of up to max_message_bytes each would be held at once;
    each FETCH now carries at most max_message_bytes, and every message is still filed once."""
    name, password, client = user
    filler = b"\r\n\r\n" + (b"z" * 998 + b"\r\n") * 600  # ~0.6 MB each
    big = [msg(n, f"Invoice {n} attached").replace(b"\r\n\r\n", filler, 1) for n in range(1, 5)]
    load_messages(client, "INBOX", big)
    w, _ = watcher_for(make_account(dovecot, name, password, fetch_batch=10, max_message_bytes=1 << 20), config)
    fetched: list[tuple[int, int]] = []  # (messages, body bytes) per FETCH
    try:
        w.connect()
        real_fetch = w.client.fetch

        def spy(uids: Any, items: Any, *a: Any, **kw: Any) -> Any:
            data = real_fetch(uids, items, *a, **kw)
            if any("BODY" in str(i) for i in items):
                fetched.append((len(uids), sum(len(v) for d in data.values() for k, v in d.items()
                                               if k.startswith(b"BODY"))))
            return data

        w.client.fetch = spy  # type: ignore[method-assign]
        assert w.process_backlog() == 4
    finally:
        w.close()
    # The batch's FETCH brings each message's first quarter MiB (a fair share of the 1 MiB budget);
    # none fits, so each comes again whole, alone: 0.6 MB + 0.6 MB > 1 MiB.
    assert [n for n, _ in fetched] == [4, 1, 1, 1, 1]
    assert all(size <= 1 << 20 for _, size in fetched)
    assert count_where(client)["Support/Billing"] == 4


class Spy:
    """Counts what the watcher asks of the server on its connection, and from which thread."""

    def __init__(self, client: IMAPClient) -> None:
        self.fetches: list[tuple[list[int], list[str]]] = []
        self.statuses: list[str] = []
        self.threads: set[threading.Thread] = set()
        self.fetched = threading.Condition()
        real_fetch, real_status = client.fetch, client.folder_status

        def fetch(uids: Any, items: Any, *a: Any, **kw: Any) -> Any:
            self.threads.add(threading.current_thread())
            data = real_fetch(uids, items, *a, **kw)
            with self.fetched:
                self.fetches.append((list(uids), [str(i) for i in items]))
                self.fetched.notify_all()
            return data

        def folder_status(folder: Any, *a: Any, **kw: Any) -> Any:
            self.threads.add(threading.current_thread())
            self.statuses.append(folder)
            return real_status(folder, *a, **kw)

        client.fetch = fetch  # type: ignore[method-assign]
        client.folder_status = folder_status  # type: ignore[method-assign]

    def body_fetches(self) -> list[tuple[list[int], list[str]]]:
        return [f for f in self.fetches if any("BODY" in i for i in f[1])]


def test_each_batch_is_one_fetch_and_one_status_per_destination(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """A batch's sizes and texts come in one FETCH (no size round trip first), and each destination's
    UIDNEXT, recorded with every claim for crash recovery, in one STATUS per batch, not per message;
    each recorded UIDNEXT is still at or below the UID its copy got."""
    name, password, client = user
    load_messages(client, "INBOX", MIXED)
    w, _ = watcher_for(make_account(dovecot, name, password, fetch_batch=7), config)
    try:
        w.connect()
        assert w.client is not None
        spy = Spy(w.client)
        assert w.process_backlog() == 7
    finally:
        w.close()
    fetches = spy.body_fetches()
    assert len(fetches) == 1 and sorted(fetches[0][0]) == [1, 2, 3, 4, 5, 6, 7]
    assert "RFC822.SIZE" in fetches[0][1]
    assert [f for f in spy.fetches if f not in fetches] == []  # no FETCH of sizes alone
    assert sorted(spy.statuses) == sorted(set(spy.statuses))  # one STATUS per destination
    copies = {header_key(h["header"]): (folder, uid) for folder in ALL_FOLDERS
              for uid, h in contents(client, folder).items()}
    rows = w.state.rows("acct")
    assert len(rows) == 7 and {r.status for r in rows} == {"done"}
    for r in rows:
        folder, uid = copies[r.key]
        assert r.folder == folder and r.dest_uidnext is not None and r.dest_uidnext <= uid


def header_key(header: bytes) -> str:
    from mailtriage.core.mailtext import message_key

    return message_key(header + b"\r\n")


def test_a_second_message_with_the_same_header_block_gets_its_own_status(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """Two messages with one header block and other bodies are two messages, both filed. Recovery
    tells copies apart by header fingerprint above the recorded UIDNEXT, so the second may not
    reuse a mark taken before the first one's copy arrived: it gets a STATUS of its own."""
    name, password, client = user
    first = msg(1, "Invoice twice")
    load_messages(client, "INBOX", [first, first.replace(b"Hello", b"Hello again")])
    w, _ = watcher_for(make_account(dovecot, name, password, fetch_batch=5), config)
    try:
        w.connect()
        assert w.client is not None
        spy = Spy(w.client)
        assert w.process_backlog() == 2
    finally:
        w.close()
    assert len([s for s in spy.statuses if s == "Support/Billing"]) == 2
    rows = sorted(w.state.rows("acct"), key=lambda r: r.uid)
    billing = sorted(contents(client, "Support/Billing"))
    assert len(billing) == 2 and [r.status for r in rows] == ["done", "done"]
    assert rows[1].dest_uidnext is not None and rows[1].dest_uidnext > billing[0]


def test_the_next_batch_is_fetched_while_the_model_classifies(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """While the model works on one batch the watcher fetches the next, on its own thread (the one
    connection is used by that thread only): the first classify call sees the second batch's FETCH
    arrive before it returns."""
    name, password, client = user
    load_messages(client, "INBOX", MIXED)
    clf = fake_classifier()
    spies: list[Spy] = []
    overlapped: list[bool] = []

    def classify(texts: Any) -> Any:
        if not overlapped:
            spy = spies[0]
            with spy.fetched:  # a deadline, not a sleep: the answer is whether the FETCH came
                overlapped.append(spy.fetched.wait_for(lambda: any(4 in u for u, _ in spy.body_fetches()),
                                                       timeout=10))
        return clf(texts)

    w = MailboxWatcher(make_account(dovecot, name, password, fetch_batch=3), "INBOX", config,
                       StateDB(config.state_path), classify, idle_slice=0.2, backoff_start=0.1)
    try:
        w.connect()
        assert w.client is not None
        spies.append(Spy(w.client))
        assert w.process_backlog() == 7
    finally:
        w.close()
    assert overlapped == [True]
    assert spies[0].threads == {threading.current_thread()}
    assert [sorted(u) for u, _ in spies[0].body_fetches()] == [[1, 2, 3], [4, 5, 6], [7]]
    assert count_where(client)["INBOX"] == 0 and {r.status for r in w.state.rows("acct")} == {"done"}


def test_the_model_gets_the_next_batch_before_this_one_is_filed(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """The model does not wait for a batch's MOVEs: the next batch is handed to it before them,
    so classifying and filing overlap. The first MOVE waits (with a deadline) for the model's
    second call to start."""
    name, password, client = user
    load_messages(client, "INBOX", MIXED)
    clf = fake_classifier()
    calls = threading.Condition()
    started: list[int] = []

    def classify(texts: Any) -> Any:
        with calls:
            started.append(len(texts))
            calls.notify_all()
        return clf(texts)

    w = MailboxWatcher(make_account(dovecot, name, password, fetch_batch=3), "INBOX", config,
                       StateDB(config.state_path), classify, idle_slice=0.2, backoff_start=0.1)
    overlapped: list[bool] = []
    try:
        w.connect()
        assert w.client is not None
        real_move = w.client.move

        def move(*a: Any, **kw: Any) -> Any:
            if not overlapped:
                with calls:
                    overlapped.append(calls.wait_for(lambda: len(started) >= 2, timeout=10))
            return real_move(*a, **kw)

        w.client.move = move  # type: ignore[method-assign]
        assert w.process_backlog() == 7
    finally:
        w.close()
    assert overlapped == [True] and started == [3, 3, 1]
    assert count_where(client)["INBOX"] == 0 and {r.status for r in w.state.rows("acct")} == {"done"}


def test_a_message_decided_by_the_batch_before_is_skipped_in_a_dry_run(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """The next batch is deduped before this one is filed (it goes to the model early); a copy of a
    message this batch decides (same Message-ID and content, another UID) is still recorded once
    and skipped once, in a dry run too, where no claim would refuse it."""
    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice 1"), msg(2, "Password reset"), msg(3, "Refund please"),
                                    msg(3, "Refund please"), msg(5, "Invoice 5")])
    w, _ = watcher_for(make_account(dovecot, name, password, fetch_batch=3, dry_run=True), config)
    try:
        w.connect()
        assert w.process_backlog() == 4
    finally:
        w.close()
    rows = sorted(w.state.rows("acct"), key=lambda r: r.uid)
    assert [(r.uid, r.status) for r in rows] == [(1, "done"), (2, "done"), (3, "done"), (4, "skipped"), (5, "done")]
    assert count_where(client)["INBOX"] == 5


def test_dry_run_touches_nothing(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    name, password, client = user
    load_messages(client, "INBOX", MIXED[:4])
    before = contents(client, "INBOX")
    w, _ = watcher_for(make_account(dovecot, name, password, dry_run=True), config)
    try:
        assert w.process_backlog() == 4
        assert w.process_backlog() == 0
    finally:
        w.close()
    assert contents(client, "INBOX") == before
    assert all(not contents(client, f) for f in ALL_FOLDERS)
    rows = w.state.rows("acct")
    assert len(rows) == 4 and all(r.dry_run and r.status == "done" for r in rows)
    assert w.state.stats()["totals"]["dry_run"] == 4 and w.state.filed() == []
    # Turning dry_run off later files what the dry run only looked at.
    real, _ = watcher_for(make_account(dovecot, name, password), config)
    try:
        assert real.process_backlog() == 4
    finally:
        real.close()
    assert count_where(client)["INBOX"] == 0


# ---- restarts, renumbering, duplicates ---------------------------------------------------------


def test_restart_resumes_without_refiling(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    name, password, client = user
    load_messages(client, "INBOX", MIXED[:3])
    account = make_account(dovecot, name, password, action="keyword")
    w, _ = watcher_for(account, config)
    assert w.process_backlog() == 3
    w.close()
    w.state.close()
    load_messages(client, "INBOX", [msg(8, "Invoice 8")])
    again, clf = watcher_for(account, config)  # a new StateDB on the same file: a restarted daemon
    try:
        assert again.process_backlog() == 1
        assert clf.batches == [1]
    finally:
        again.close()
    assert len(again.state.rows("acct")) == 4


def test_uidvalidity_change_and_duplicates_are_not_refiled(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    name, password, client = user
    load_messages(client, "INBOX", MIXED[:3])
    account = make_account(dovecot, name, password, action="keyword")
    w, clf = watcher_for(account, config)
    try:
        assert w.process_backlog() == 3
        # Simulate a server that renumbered the mailbox: what we stored no longer matches.
        conn = w.state._conn()
        conn.execute("UPDATE mailbox_state SET uidvalidity = uidvalidity - 1")
        conn.execute("UPDATE messages SET uidvalidity = uidvalidity - 1")
        # ... and the same message delivered a second time.
        load_messages(client, "INBOX", [MIXED[0]])
        assert w.process_backlog() == 0
        assert clf.batches == [3]  # nothing was classified again
        statuses = sorted(r.status for r in w.state.rows("acct"))
        assert statuses == ["done"] * 3 + ["skipped"] * 4
        assert w.state.last_uid("acct", "INBOX", w.uidvalidity or 0) == 4
    finally:
        w.close()
    flags = [m["flags"] for m in contents(client, "INBOX").values()]
    assert flags.count({b"mt_billing"}) == 1 and flags.count(set()) == 1  # the duplicate is left alone


def test_a_different_message_reusing_a_message_id_is_filed_and_a_redelivery_is_not(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """Keyed by Message-ID alone, a second, different message with a reused
    Message-ID was skipped and left in INBOX forever. Key plus content fingerprint: it is filed;
    the same message delivered again (another Received line) is still skipped."""
    name, password, client = user
    first = msg(1, "Invoice 1 wrong", mid="<reused@example.com>")
    load_messages(client, "INBOX", [first])
    w, clf = watcher_for(make_account(dovecot, name, password), config)
    try:
        assert w.process_backlog() == 1
        other = msg(2, "Password reset please", mid="<reused@example.com>")
        redelivered = b"Received: from mx2.example.com by mail.example.com; Tue, 7 May 2024\r\n" + first
        load_messages(client, "INBOX", [other, redelivered])
        assert w.process_backlog() == 1
    finally:
        w.close()
    where = count_where(client)
    assert where["Support/Login"] == 1 and where["Support/Billing"] == 1
    assert where["INBOX"] == 1  # the re-delivery is left alone, as before
    assert sorted(r.status for r in w.state.rows("acct")) == ["done", "done", "skipped"]


def test_the_same_message_in_two_mailboxes_is_filed_once_by_concurrent_watchers(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """Watcher A has decided a message and is acting on it ('pending') while watcher
    B, on another mailbox of the account, meets the same message. The check used to see only
    'done' rows, so B filed it too (two copies); the claim is atomic over key and content."""
    name, password, client = user
    client.create_folder("Other")
    m = msg(1, "Invoice for two addresses")
    load_messages(client, "INBOX", [m])
    load_messages(client, "Other", [m])
    account = make_account(dovecot, name, password)
    a, _ = watcher_for(account, config)
    b = MailboxWatcher(account, "Other", config, StateDB(config.state_path), fake_classifier(), idle_slice=0.2)
    acting, b_done = threading.Event(), threading.Event()
    real_act = a.filing.act

    def slow_act(*args: Any, **kwargs: Any) -> None:
        acting.set()
        b_done.wait(10)  # B runs its whole backlog while A holds its claim
        real_act(*args, **kwargs)

    a.filing.act = slow_act  # type: ignore[method-assign]
    thread = threading.Thread(target=a.process_backlog)
    thread.start()
    try:
        assert acting.wait(10)
        with structlog.testing.capture_logs() as logs:
            b.process_backlog()
        b_done.set()
        thread.join(10)
    finally:
        b_done.set()
        a.close()
        b.close()
    assert "message_skipped_already_decided" in [e["event"] for e in logs]
    where = count_where(client)
    assert where["Support/Billing"] == 1 and where["INBOX"] == 0
    assert len(contents(client, "Other")) == 1  # B left its copy where it was


def test_a_second_worker_on_the_same_mailbox_waits_for_the_first(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """One worker files a mailbox at a time (the lock beside the state DB), so a
    second one's crash recovery never meets the first one's in-flight 'pending' rows."""
    name, password, client = user
    load_messages(client, "INBOX", MIXED[:2])
    account = make_account(dovecot, name, password)
    first, _ = watcher_for(account, config)
    second, _ = watcher_for(account, config)
    try:
        first.connect()
        with pytest.raises(MailboxError, match="another mailtriage worker is filing acct/INBOX"):
            second.process_backlog()
        second.check()  # `mailtriage check` still works beside a running worker
        first.close()
        assert second.process_backlog() == 2
    finally:
        first.close()
        second.close()
    assert count_where(client)["INBOX"] == 0


# ---- refused actions: retry with backoff, then quarantine ----------------------


def _metric(outcome: str, label: str = "billing") -> float:
    from mailtriage import metrics

    return metrics.MESSAGES.labels(category=label, outcome=outcome)._value.get()


def test_a_refused_action_is_retried_after_a_backoff_and_filed(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """A refused STATUS/MOVE used to leave the message 'failed' in INBOX forever."""
    import dataclasses

    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice retry")])
    config = dataclasses.replace(config, retry_backoff=0.2, retry_attempts=3)
    w, _ = watcher_for(make_account(dovecot, name, password), config)
    try:
        w.connect()
        client.delete_folder("Support/Billing")  # the server refuses the action for a while
        w.process_backlog()
        (row,) = w.state.rows("acct")
        assert (row.status, row.attempts) == ("failed", 1) and row.retry_at is not None
        assert len(contents(client, "INBOX")) == 1
        client.create_folder("Support/Billing")
        retry_at = row.retry_at
        assert wait_for(lambda: time.time() > retry_at)  # the retry is due by the clock
        w.process_backlog()
    finally:
        w.close()
    assert count_where(client)["Support/Billing"] == 1 and count_where(client)["INBOX"] == 0
    (row,) = w.state.rows("acct")
    assert row.status == "done" and not row.quarantined


def test_when_retries_run_out_the_message_is_quarantined_and_counted(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    import dataclasses
    import io

    from mailtriage.store.stats import print_stats

    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice never filed")])
    config = dataclasses.replace(config, retry_backoff=0.1, retry_attempts=2)
    before = _metric("quarantined")
    w, _ = watcher_for(make_account(dovecot, name, password), config)
    try:
        w.connect()
        client.delete_folder("Support/Billing")  # and it never comes back
        assert backlog_until(w, lambda: bool(contents(client, UNSURE_FOLDER)))
    finally:
        w.close()
    assert len(contents(client, UNSURE_FOLDER)) == 1 and not contents(client, "INBOX")
    (row,) = w.state.rows("acct")
    assert row.status == "done" and row.quarantined and row.folder == UNSURE_FOLDER and row.attempts == 2
    assert _metric("quarantined") == before + 1
    assert w.state.stats()["totals"]["quarantined"] == 1 and w.state.stats()["totals"]["filed"] == 0
    out = io.StringIO()
    print_stats(dataclasses.replace(config, accounts=()), out=out)
    assert "quarantined 1" in out.getvalue()


def test_a_due_retry_ends_idle_early(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    """The running watcher sits in IDLE (idle_timeout 1500 s); a retry due in 0.3 s is still made."""
    import dataclasses

    name, password, client = user
    config = dataclasses.replace(config, retry_backoff=0.3, retry_attempts=3)
    idles: list[float] = []

    def connect(acct: AccountConfig) -> IMAPClient:
        c = connection.connect(acct, timeout=5)
        real_idle = c.idle

        def counted_idle() -> Any:
            idles.append(time.monotonic())
            return real_idle()

        c.idle = counted_idle  # type: ignore[method-assign]
        return c

    w, _ = watcher_for(make_account(dovecot, name, password, idle_timeout=1500), config, connect=connect)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: len(idles) >= 1)
        client.delete_folder("Support/Billing")
        load_messages(client, "INBOX", [msg(1, "Invoice while refused")])
        assert wait_for(lambda: any(r.status == "failed" for r in w.state.rows("acct")))
        client.create_folder("Support/Billing")
        assert wait_for(lambda: count_where(client)["Support/Billing"] == 1)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and count_where(client)["INBOX"] == 0


# ---- servers without MOVE / IDLE ----------------------------------------------------------------


def _server_user(server: Dovecot) -> IMAPClient:
    client = server.client()
    for folder in ALL_FOLDERS:
        client.create_folder(folder)
    return client


def test_no_move_server_uses_copy_uid_expunge_and_spares_deleted(
    dovecot_factory: Callable[..., Dovecot], make_account: Any, config: Config
) -> None:
    server = dovecot_factory(extra_conf=NO_MOVE)
    client = _server_user(server)
    try:
        load_messages(client, "INBOX", [msg(9, "Someone deleted this")], flags=[DELETED])
        load_messages(client, "INBOX", MIXED[:3])
        w, _ = watcher_for(make_account(server, "support", "secret"), config)
        try:
            w.process_backlog()
            assert not w._has_move
        finally:
            w.close()
        inbox = contents(client, "INBOX")
        assert len(inbox) == 1 and DELETED in next(iter(inbox.values()))["flags"]
        assert count_where(client)["Support/Billing"] == 1
    finally:
        connection.close(client)


def test_polls_when_server_lacks_idle(dovecot_factory: Callable[..., Dovecot], make_account: Any, config: Config) -> None:
    server = dovecot_factory(extra_conf=NO_IDLE)
    client = _server_user(server)
    w, _ = watcher_for(make_account(server, "support", "secret", poll_interval=1), config)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: w.client is not None and w.uidvalidity is not None)
        load_messages(client, "INBOX", [msg(1, "Refund now")])
        assert wait_for(lambda: count_where(client)["Support/Refunds"] == 1)
        assert not w._has_idle
    finally:
        stop.set()
        thread.join(5)
        connection.close(client)
    assert not thread.is_alive()


# ---- the run loop -------------------------------------------------------------------------------


def test_idle_files_new_mail_and_survives_a_dropped_connection(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice backlog")])
    clients: list[IMAPClient] = []

    def connect(account: AccountConfig) -> IMAPClient:
        c = connection.connect(account, timeout=5)
        clients.append(c)
        return c

    w, _ = watcher_for(make_account(dovecot, name, password), config, connect=connect)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: count_where(client)["Support/Billing"] == 1)  # catch-up
        load_messages(client, "INBOX", [msg(2, "Password lost")])            # arrives during IDLE
        assert wait_for(lambda: count_where(client)["Support/Login"] == 1)
        # The network drops: the watcher notices, reconnects with backoff and carries on.
        clients[-1].socket().shutdown(socket.SHUT_RDWR)
        assert wait_for(lambda: len(clients) >= 2)
        load_messages(client, "INBOX", [msg(3, "Refund after reconnect")])
        assert wait_for(lambda: count_where(client)["Support/Refunds"] == 1)
    finally:
        t0 = time.monotonic()
        stop.set()
        thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 3  # stop is noticed promptly
    assert count_where(client)["INBOX"] == 0


def test_mail_arriving_between_the_backlog_search_and_idle_is_filed_at_once(
    dovecot: Dovecot, user: Any, make_account: Any, config: Config
) -> None:
    """The race CI hit: a message delivered after the catch-up's SEARCH is reported by Dovecot as
    `* N EXISTS` in the reply to a later command (the MOVE); imaplib files that away unread and the
    IDLE that follows reports nothing new, so the message waited for the next idle_timeout."""
    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice backlog")])
    appended = threading.Event()

    def connect(account: AccountConfig) -> IMAPClient:
        c = connection.connect(account, timeout=5)
        real_search = c.search

        def search(*args: Any, **kw: Any) -> Any:
            found = real_search(*args, **kw)
            if not appended.is_set():  # right after the first catch-up SEARCH: new mail arrives
                appended.set()
                load_messages(dovecot.client(name, password), "INBOX", [msg(2, "Password lost")])
            return found

        c.search = search  # type: ignore[method-assign]
        return c

    w, _ = watcher_for(make_account(dovecot, name, password, idle_timeout=1500), config, connect=connect)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: count_where(client)["Support/Billing"] == 1)
        assert appended.is_set()
        assert wait_for(lambda: count_where(client)["Support/Login"] == 1, timeout=10), count_where(client)
    finally:
        stop.set()
        thread.join(5)
    assert count_where(client)["INBOX"] == 0


def test_dovecot_restart_mid_backlog_the_watcher_reconnects_and_finishes(
    dovecot_factory: Callable[..., Dovecot], make_account: Any, config: Config
) -> None:
    """The server goes down and comes back (same port, same mail) while a backlog
    is being filed; the running watcher reconnects by itself and files every message once."""
    server = dovecot_factory()
    client = _server_user(server)
    connection.close(client)
    feed = server.client()
    load_messages(feed, "INBOX", [msg(n, s) for n in range(30) for s in ["Invoice due"]])
    connection.close(feed)
    w, _ = watcher_for(make_account(server, "support", "secret", fetch_batch=3), config)
    real_batch, batches, restarted = w.filing.process_batch, [0], threading.Event()

    def batch(*args: Any, **kwargs: Any) -> int:
        batches[0] += 1
        if batches[0] == 3 and not restarted.is_set():
            server.restart()  # between two batches, from inside the watcher: deterministic
            restarted.set()
        return real_batch(*args, **kwargs)

    w.filing.process_batch = batch  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    with structlog.testing.capture_logs() as logs:
        thread.start()
        try:
            def filed() -> int:
                # The restart happens on the watcher's thread when its third batch starts, so it
                # can cut this poll's session too, not only refuse its login.
                try:
                    c = server.client()
                except Exception:  # noqa: BLE001 - down for the restart (refused, or DovecotError)
                    return -1
                try:
                    return count_where(c)["Support/Billing"]
                except connection.CONNECTION_ERRORS:
                    return -1
                finally:
                    connection.close(c)
            assert wait_for(lambda: filed() == 30, timeout=60)
        finally:
            stop.set()
            thread.join(10)
    assert restarted.is_set() and not thread.is_alive()
    assert "imap_connection_lost" in [e["event"] for e in logs]
    c = server.client()
    try:
        assert count_where(c)["INBOX"] == 0
    finally:
        connection.close(c)
    assert sorted({r.status for r in w.state.rows("acct")}) == ["done"] and len(w.state.rows("acct")) == 30


def test_idle_is_reissued_before_idle_timeout(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    name, password, _client = user
    account = make_account(dovecot, name, password)
    object.__setattr__(account, "idle_timeout", 0.3)  # the config floor is 30 s; shrink it for the test
    idles: list[float] = []

    def connect(acct: AccountConfig) -> IMAPClient:
        c = connection.connect(acct, timeout=5)
        real_idle = c.idle

        def counted_idle() -> Any:
            idles.append(time.monotonic())
            return real_idle()

        c.idle = counted_idle  # type: ignore[method-assign]
        return c

    w, _ = watcher_for(account, config, connect=connect)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: len(idles) >= 4, timeout=5)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    gaps = [b - a for a, b in zip(idles, idles[1:])]
    assert all(0.25 < g < 1.5 for g in gaps), gaps


def test_run_backs_off_while_server_is_unreachable_and_stops(
    dovecot: Dovecot, imap_user: tuple[str, str], make_account: Any, config: Config
) -> None:
    # (Wrong credentials get the same treatment; test_actions checks their message. Repeating
    # failed logins here would only buy Dovecot's 2 s auth-failure delays.)
    attempts: list[float] = []

    def connect(account: AccountConfig) -> IMAPClient:
        attempts.append(time.monotonic())
        return connection.connect(account, timeout=5)

    w, _ = watcher_for(make_account(dovecot, *imap_user, port=1), config, connect=connect)
    with pytest.raises(MailboxError, match="cannot connect to 127.0.0.1:1"):
        w.check()
    attempts.clear()
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    assert wait_for(lambda: len(attempts) >= 4, timeout=10)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.09 and gaps[2] > gaps[0]  # exponential backoff (0.1, 0.2, 0.4 ... capped at 1 s)


def test_missing_destination_folder_fails_fast(dovecot: Dovecot, imap_user: tuple[str, str], make_account: Any, config: Config) -> None:
    w, _ = watcher_for(make_account(dovecot, *imap_user), config)
    with pytest.raises(MailboxError, match=r"Support/Billing.*do not exist on account 'acct'"):
        w.check()
    # A dry run still runs (it changes nothing) and only warns.
    dry, _ = watcher_for(make_account(dovecot, *imap_user, dry_run=True), config, path=str(Path(config.state_path).with_suffix(".dry")))
    dry.check()


# ---- crashes --------------------------------------------------------------------------------------


class Crash(Exception):
    """Stands for the process dying at this exact point."""


def _crash_once(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = getattr(actions, name)

    def boom(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(actions, name, real)
        raise Crash(f"crash in {name}")

    monkeypatch.setattr(actions, name, boom)


@pytest.mark.parametrize(
    ("extra_conf", "action", "crash_in", "recovery"),
    [
        # after COPY, before the original is removed
        (NO_MOVE, "move", "delete_original", "recovered_original_removed"),
        # after APPEND + verify, before the original is removed
        ("", "header", "delete_original", "recovered_original_removed"),
        # after APPEND, before it was verified
        ("", "header", "find_copy", "recovered_original_removed"),
        # 'pending' recorded, the action never ran
        ("", "move", "move", "recovered_redone"),
        ("", "header", "append_flags", "recovered_redone"),
    ],
)
def test_crash_mid_action_then_restart_leaves_exactly_one_copy(
    dovecot_factory: Callable[..., Dovecot], make_account: Any, config: Config, monkeypatch: pytest.MonkeyPatch,
    extra_conf: str, action: str, crash_in: str, recovery: str,
) -> None:
    server = dovecot_factory(extra_conf=extra_conf)
    client = _server_user(server)
    try:
        load_messages(client, "INBOX", [msg(1, "Invoice crash"), msg(2, "Password after crash")])
        account = make_account(server, "support", "secret", action=action)
        _crash_once(monkeypatch, crash_in)
        w, _ = watcher_for(account, config)
        with pytest.raises(Crash):
            w.process_backlog()
        w.close()
        assert [r.status for r in w.state.pending("acct", "INBOX")] == ["pending"]
        restarted, _ = watcher_for(account, config)
        try:
            with structlog.testing.capture_logs() as logs:
                restarted.connect()  # recovery runs on connect
            assert [e["event"] for e in logs if e["event"].startswith("recovered")] == [recovery]
            assert restarted.state.pending("acct", "INBOX") == []
            restarted.process_backlog()
        finally:
            restarted.close()
        assert count_where(client) == {"INBOX": 0, "Support/Billing": 1, "Support/Login": 1, "Support/Refunds": 0,
                                       "Support/Unsure": 0}
        assert sorted(r.status for r in restarted.state.rows("acct")) == ["done", "done"]
        if action == "header":
            (billing,) = contents(client, "Support/Billing").values()
            assert billing["header"].startswith(b"X-Mailtriage-Category: billing")
    finally:
        connection.close(client)


# ---- the real model ------------------------------------------------------------------------------


def test_with_the_real_tiny_model(dovecot: Dovecot, user: Any, make_account: Any, config: Config, tiny_model_dir: Path) -> None:
    from mailtriage.model.transformers import load_classifier

    clf = load_classifier(tiny_model_dir, device="cpu", expected_labels=list(CATEGORIES))
    name, password, client = user
    load_messages(client, "INBOX", MIXED[:3])
    w = MailboxWatcher(make_account(dovecot, name, password), "INBOX", config, StateDB(config.state_path),
                       lambda texts: (clf.classify(texts), clf.version))
    try:
        assert w.process_backlog() == 3
    finally:
        w.close()
    assert count_where(client)["INBOX"] == 0
    assert {r.model_version for r in w.state.rows("acct")} == {clf.version}


# ---- poison messages --------------------------------------------------------


def test_poison_message_is_set_aside_and_the_rest_keeps_flowing(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    """A message the classifier always fails on used to raise out of the batch, so the watcher
    reconnected forever and filed nothing. Now it is recorded 'failed', moved to the quarantine
    folder (default: the unsure folder) so it is not stranded, and never fed to the model again;
    the others are filed."""
    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice 1"), msg(2, "Poison pill"), msg(3, "Refund please")])
    clf = fake_classifier()
    seen: list[str] = []

    def classify(texts: Any) -> Any:
        seen.extend(texts)
        if any("poison" in t.lower() for t in texts):
            raise RuntimeError("tokenizer exploded")
        return clf(texts)

    w = MailboxWatcher(make_account(dovecot, name, password, fetch_batch=3), "INBOX", config,
                       StateDB(config.state_path), classify, idle_slice=0.2, backoff_start=0.1)
    try:
        assert w.process_backlog() == 2
        assert count_where(client) == {"INBOX": 0, "Support/Billing": 1, "Support/Login": 0,
                                       "Support/Refunds": 1, "Support/Unsure": 1}
        (poison,) = [r for r in w.state.rows("acct") if r.quarantined]
        assert poison.folder == UNSURE_FOLDER and poison.label is None and poison.status == "done"
        assert w.state.stats()["totals"]["quarantined"] == 1
        seen.clear()
        assert w.process_backlog() == 0 and seen == []  # not retried forever
    finally:
        w.close()


def test_a_broken_model_is_not_taken_for_poison(dovecot: Dovecot, user: Any, make_account: Any, config: Config) -> None:
    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice 1"), msg(2, "Refund please")])

    def broken(texts: Any) -> Any:
        raise RuntimeError("CUDA out of memory")

    w = MailboxWatcher(make_account(dovecot, name, password), "INBOX", config,
                       StateDB(config.state_path), broken, idle_slice=0.2, backoff_start=0.1)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            w.process_backlog()
        assert w.state.rows("acct") == [] and count_where(client)["INBOX"] == 2  # retried later, as before
    finally:
        w.close()

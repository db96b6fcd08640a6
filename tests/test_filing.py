"""Filing (imap/filing.py) against a real Dovecot: what may and may not be taken for poison, where a
refused quarantine leaves a message, and who may file a mailbox reached under several names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from mailtriage.config import Config
from mailtriage.errors import InferenceUnavailable, MailboxError
from mailtriage.imap.watcher import MailboxWatcher
from mailtriage.model.remote import HttpClassifier
from mailtriage.store.state import StateDB
from mailtriage.testing.httpstub import HttpStub, JsonHandler
from tests.test_watcher import (  # noqa: F401 - fixtures
    CATEGORIES, UNSURE_FOLDER, backlog_until, config, contents, count_where, fake_classifier, make_account, msg, user,
)

pytestmark = pytest.mark.component


class FlakyInference(HttpStub):
    """A TEI-shaped inference server on a real socket: answers 503 to the first ``failures``
    requests, then scores 0.9 for the category whose name is in the text."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests = 0
        stub = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests += 1
                if stub.requests <= stub.failures:
                    return self.send_json(503, b'{"error": "overloaded"}')
                out = []
                for (text,) in body["inputs"]:
                    hit = next((c for c in CATEGORIES if c in text.lower()), "billing")
                    out.append([{"label": c, "score": 0.9 if c == hit else 0.05} for c in CATEGORIES])
                self.send_json(200, json.dumps(out).encode())


        self.serve(Handler)



@pytest.fixture
def flaky() -> Iterator[FlakyInference]:
    stub = FlakyInference(failures=2)
    try:
        yield stub
    finally:
        stub.close()


def _passes(w: MailboxWatcher, until: Any, most: int = 6) -> int:
    """Backlog passes as the watcher's loop makes them (an unavailable model ends a pass) until
    ``until()`` holds; returns how many passes it took."""
    for n in range(1, most + 1):
        try:
            w.process_backlog()
        except InferenceUnavailable:
            pass
        if until():
            return n
    return most


def test_an_overloaded_inference_server_never_quarantines_a_good_message(
    dovecot: Any, user: Any, make_account: Any, config: Config, flaky: FlakyInference
) -> None:
    """The server answers 503 to the batch and to the message alone, then recovers: the message
    used to be recorded as poison and moved to the quarantine folder at once."""
    name, password, client = user
    from mailtriage.testing.dovecot import load_messages

    load_messages(client, "INBOX", [msg(1, "Refunds please")])
    clf = HttpClassifier(flaky.url, tuple(CATEGORIES), api="tei", timeout=5)
    w = MailboxWatcher(make_account(dovecot, name, password), "INBOX", config, StateDB(config.state_path),
                       lambda texts: (clf.classify(texts), clf.version), idle_slice=0.2, backoff_start=0.1)
    try:
        _passes(w, lambda: count_where(client)["INBOX"] == 0)
    finally:
        w.close()
    assert count_where(client) == {"INBOX": 0, "Support/Billing": 0, "Support/Login": 0, "Support/Refunds": 1,
                                   UNSURE_FOLDER: 0}
    (row,) = w.state.rows("acct")
    assert (row.status, row.label, row.quarantined) == ("done", "refunds", False)
    assert flaky.requests >= 3


def test_messages_that_fail_exactly_like_their_batch_are_deferred_not_quarantined(
    dovecot: Any, user: Any, make_account: Any, config: Config
) -> None:
    """The model hiccups for a moment (the batch and each message alone fail with the same error),
    then answers the canary: neither message is poison, both are filed on the next pass."""
    from mailtriage.testing.dovecot import load_messages

    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice 1"), msg(2, "Refund please")])
    rules, calls = fake_classifier(), [0]

    def hiccup(texts: Any) -> Any:
        calls[0] += 1
        if calls[0] <= 3:  # the batch, then each message alone
            raise RuntimeError("device busy")
        return rules(texts)

    w = MailboxWatcher(make_account(dovecot, name, password), "INBOX", config, StateDB(config.state_path), hiccup,
                       idle_slice=0.2, backoff_start=0.1)
    try:
        with pytest.raises(InferenceUnavailable, match="2 message"):
            w.process_backlog()
        assert w.state.rows("acct") == [] and count_where(client)["INBOX"] == 2
        assert w.process_backlog() == 2
    finally:
        w.close()
    assert count_where(client)["Support/Billing"] == 1 and count_where(client)["Support/Refunds"] == 1
    assert not any(r.quarantined for r in w.state.rows("acct"))


# ---- a refused quarantine ---------------------------------------------------------------------


def test_a_refused_quarantine_is_retried_and_stats_say_where_the_message_is(
    dovecot: Any, user: Any, make_account: Any, config: Config
) -> None:
    """The category folder and the quarantine (unsure) folder both refuse: the message used to stay
    in INBOX for good, never retried, while `stats` counted it 'quarantined'."""
    import dataclasses
    import io

    from mailtriage.store.stats import print_stats
    from mailtriage.testing.dovecot import load_messages

    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice stranded")])
    config = dataclasses.replace(config, retry_backoff=0.1, retry_attempts=2)
    w = MailboxWatcher(make_account(dovecot, name, password), "INBOX", config, StateDB(config.state_path),
                       fake_classifier(), idle_slice=0.2, backoff_start=0.1)
    try:
        w.connect()
        client.delete_folder("Support/Billing")
        client.delete_folder(UNSURE_FOLDER)
        assert backlog_until(w, lambda: any(r.quarantined and r.status == "failed" for r in w.state.rows("acct")))
        (row,) = w.state.rows("acct")
        assert row.retry_at is not None, "a refused quarantine must be tried again"
        stats = w.state.stats()
        assert stats["totals"]["quarantined"] == 0 and stats["totals"]["quarantine_pending"] == 1
        assert stats["in_source"] == {"retrying": 0, "quarantine_pending": 1}
        out = io.StringIO()
        print_stats(dataclasses.replace(config, accounts=()), out=out)
        assert "quarantined 0" in out.getvalue() and "still in the watched mailbox" in out.getvalue()
        assert count_where_safe(client) == {"INBOX": 1}

        client.create_folder(UNSURE_FOLDER)  # the server accepts the quarantine again
        assert backlog_until(w, lambda: len(contents(client, UNSURE_FOLDER)) == 1)
    finally:
        w.close()
    assert not contents(client, "INBOX")
    (row,) = w.state.rows("acct")
    assert row.status == "done" and row.quarantined and row.folder == UNSURE_FOLDER
    assert w.state.stats()["totals"]["quarantined"] == 1 and w.state.stats()["in_source"]["quarantine_pending"] == 0


def count_where_safe(client: Any) -> dict[str, int]:
    """Messages per folder, for the folders that exist."""
    existing = {f[2] for f in client.list_folders()}
    return {f: n for f in ["INBOX", *CATEGORIES.values(), UNSURE_FOLDER] if f in existing
            for n in [len(contents(client, f))] if n}


# ---- one mailbox reached under two names ---------------------------------------------------------


def test_two_accounts_reaching_one_mailbox_file_each_message_once(
    dovecot: Any, user: Any, make_account: Any, config: Config
) -> None:
    """127.0.0.1 and localhost are one server (two daemons on one state database, so the config
    check cannot see both): the mailbox lock is the login's, not the account name's. Header action:
    both used to file, 20 messages became 40 copies."""
    import dataclasses

    from mailtriage.testing.dovecot import load_messages

    name, password, client = user
    load_messages(client, "INBOX", [msg(n, s) for n, s in enumerate(["Invoice a", "Refund b", "Password c"])])
    a = MailboxWatcher(make_account(dovecot, name, password, action="header"), "INBOX", config,
                       StateDB(config.state_path), fake_classifier(), idle_slice=0.2, backoff_start=0.1)
    other = dataclasses.replace(make_account(dovecot, name, password, action="header"), name="acct2", host="localhost")
    b = MailboxWatcher(other, "INBOX", config, StateDB(config.state_path), fake_classifier(), idle_slice=0.2,
                       backoff_start=0.1)
    try:
        a.connect()
        with pytest.raises(MailboxError, match="another mailtriage worker is filing acct2/INBOX"):
            b.process_backlog()
        assert a.process_backlog() == 3
        a.close()
        assert b.process_backlog() == 0  # its turn now: nothing left to file
    finally:
        a.close()
        b.close()
    assert count_where(client) == {"INBOX": 0, "Support/Billing": 1, "Support/Login": 1, "Support/Refunds": 1,
                                   UNSURE_FOLDER: 0}


def test_a_renamed_account_in_a_second_daemon_does_not_refile(
    dovecot: Any, user: Any, make_account: Any, config: Config
) -> None:
    """Keyword action (mail stays in INBOX): the account is renamed and the daemon restarted on the
    same state database. Its new name had no rows and no cursor, so every message was decided and
    tagged again — with a changed model, a second category keyword."""
    import dataclasses

    from mailtriage.testing.dovecot import load_messages
    from mailtriage.testing.fakes import KeywordClassifier

    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice one"), msg(2, "Refund two")])
    first = make_account(dovecot, name, password, action="keyword")
    w = MailboxWatcher(first, "INBOX", config, StateDB(config.state_path), fake_classifier(), idle_slice=0.2)
    try:
        assert w.process_backlog() == 2
    finally:
        w.close()
    everything_login = KeywordClassifier(tuple(CATEGORIES), {"invoice": "login", "refund": "login"}, version="v2",
                                         default="login")
    renamed = dataclasses.replace(first, name="support-desk", host="localhost")
    w2 = MailboxWatcher(renamed, "INBOX", config, StateDB(config.state_path), everything_login, idle_slice=0.2)
    try:
        assert w2.process_backlog() == 0
    finally:
        w2.close()
    flags = [f for d in contents(client, "INBOX").values() for f in d["flags"] if f.startswith(b"mt_")]
    assert len(flags) == 2 and not any(f.endswith(b"login") for f in flags), flags
    assert {r.account for r in w2.state.rows() if r.status == "done"} == {"acct"}


def test_a_renamed_account_finishes_what_the_old_name_left_pending(
    dovecot: Any, user: Any, make_account: Any, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash under the old name leaves a 'pending' row; the renamed account's recovery takes it
    over and files the message once (its claim alone would skip it forever)."""
    import dataclasses

    from mailtriage.imap import actions
    from mailtriage.testing.dovecot import load_messages

    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice crash")])
    first = make_account(dovecot, name, password)
    w = MailboxWatcher(first, "INBOX", config, StateDB(config.state_path), fake_classifier(), idle_slice=0.2)
    real_move = actions.move

    class Crash(Exception):
        pass

    def crash(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(actions, "move", real_move)
        raise Crash("the process dies here")

    monkeypatch.setattr(actions, "move", crash)
    with pytest.raises(Crash):
        w.process_backlog()
    w.close()
    renamed = dataclasses.replace(first, name="support-desk")
    w2 = MailboxWatcher(renamed, "INBOX", config, StateDB(config.state_path), fake_classifier(), idle_slice=0.2)
    try:
        w2.process_backlog()
    finally:
        w2.close()
    assert count_where(client)["Support/Billing"] == 1 and count_where(client)["INBOX"] == 0
    assert [(r.account, r.status) for r in w2.state.rows()] == [("support-desk", "done")]

"""action = "label" (Gmail: UID STORE +X-GM-LABELS) end to end against a real Dovecot behind
mailtriage.testing.gmail_proxy, which speaks X-GM-EXT-1 over it: each message labelled once, the
unsure ones with the unsure label, archived only when configured, no double label after a crash or
a SIGKILL; and `check`/`serve` refuse the action on a server without X-GM-EXT-1."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from imapclient import IMAPClient

from mailtriage.cli.check import run_check
from mailtriage.config import AccountConfig, Config, ModelConfig, TrainingConfig, parse_config
from mailtriage.errors import ConfigError, MailboxError
from mailtriage.imap import actions, connection
from mailtriage.imap.watcher import MailboxWatcher
from mailtriage.store.state import StateDB
from mailtriage.testing.dovecot import Dovecot, load_messages
from mailtriage.testing.fakes import KeywordClassifier
from mailtriage.testing.gmail_proxy import GmailProxy, astrings, with_gmail_capability

pytestmark = pytest.mark.component

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
UNSURE = "Support/Unsure"
FOLDERS = [*CATEGORIES.values(), UNSURE]
WORDS = {"invoice": "billing", "password": "login", "refund": "refunds"}


def msg(n: int, subject: str) -> bytes:
    return (
        f"From: Customer {n} <c{n}@example.com>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <gm-{n}@example.com>\r\nDate: Mon, 6 May 2024 07:08:09 +0200\r\n\r\nHello, {subject}.\r\n"
    ).encode()


MIXED = [msg(1, "Invoice 1 wrong"), msg(2, "Password reset"), msg(3, "Refund please"), msg(4, "Just saying hi"),
         msg(5, "Invoice 5 again"), msg(6, "Refund status"), msg(7, "Password expired")]
EXPECTED = {"<gm-1@example.com>": "Support/Billing", "<gm-2@example.com>": "Support/Login",
            "<gm-3@example.com>": "Support/Refunds", "<gm-4@example.com>": UNSURE,
            "<gm-5@example.com>": "Support/Billing", "<gm-6@example.com>": "Support/Refunds",
            "<gm-7@example.com>": "Support/Login"}


@pytest.fixture
def proxy(dovecot: Dovecot) -> Iterator[GmailProxy]:
    with GmailProxy(dovecot.host, dovecot.port) as running:
        yield running


@pytest.fixture
def direct(dovecot: Dovecot, imap_user: tuple[str, str]) -> Iterator[IMAPClient]:
    """The user's mailbox seen straight from Dovecot, with the label folders."""
    client = dovecot.client(*imap_user)
    for folder in FOLDERS:
        client.create_folder(folder)
    try:
        yield client
    finally:
        connection.close(client)


def ids_in(client: IMAPClient, folder: str) -> Counter[str]:
    """Message-IDs in ``folder`` (straight from Dovecot), counted, \\Deleted ones left out."""
    client.select_folder(folder, readonly=True)
    uids = client.search(["UNDELETED"])
    out: Counter[str] = Counter()
    if uids:
        for d in client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).values():
            out[d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().split(":", 1)[1].strip()] += 1
    return out


def where(client: IMAPClient) -> dict[str, Counter[str]]:
    return {folder: ids_in(client, folder) for folder in ["INBOX", *FOLDERS]}


def account(tmp_path: Path, host: str, port: int, user: tuple[str, str], **kw: Any) -> AccountConfig:
    pw = tmp_path / "pw"
    pw.write_text(user[1])
    pw.chmod(0o600)
    return AccountConfig(name="gmail", host=host, port=port, tls="none", username=user[0], password_file=str(pw),
                         action="label", idle_timeout=30, fetch_batch=3, reconnect_max=1, **kw)


def config(tmp_path: Path, acct: AccountConfig) -> Config:
    return Config(categories=CATEGORIES, unsure_folder=UNSURE, state_path=str(tmp_path / "state.sqlite3"),
                  model=ModelConfig(threshold=0.6, path=str(tmp_path / "no-model")),
                  training=TrainingConfig(schedule=""), accounts=(acct,))


def watcher(cfg: Config) -> MailboxWatcher:
    rules = KeywordClassifier(tuple(CATEGORIES), WORDS, version="kw-gm", default="billing")
    return MailboxWatcher(cfg.accounts[0], "INBOX", cfg, StateDB(cfg.state_path), rules, idle_slice=0.2,
                          backoff_start=0.1)


# ---- the proxy itself ----------------------------------------------------------------------------


def test_proxy_pure_helpers() -> None:
    assert astrings(b'"Support/Billing" \\Inbox "a \\"b\\""') == ["Support/Billing", "\\Inbox", 'a "b"']
    assert with_gmail_capability(b"* CAPABILITY IMAP4rev1 IDLE\r\n") == b"* CAPABILITY IMAP4rev1 IDLE X-GM-EXT-1\r\n"
    assert with_gmail_capability(b"A1 OK [CAPABILITY IMAP4rev1 MOVE] Logged in\r\n") == (
        b"A1 OK [CAPABILITY IMAP4rev1 MOVE X-GM-EXT-1] Logged in\r\n")
    assert with_gmail_capability(b"* 1 FETCH (BODY[] {3}\r\n") == b"* 1 FETCH (BODY[] {3}\r\n"


def test_proxy_passes_mail_through_and_emulates_labels_once(
    proxy: GmailProxy, dovecot: Dovecot, imap_user: tuple[str, str], direct: IMAPClient
) -> None:
    client = IMAPClient(proxy.host, port=proxy.port, ssl=False, timeout=10)
    try:
        assert b"X-GM-EXT-1" not in direct.capabilities()
        assert b"X-GM-EXT-1" in client.capabilities()  # greeting's [CAPABILITY]
        client.login(*imap_user)
        assert b"X-GM-EXT-1" in client.capabilities() and b"IDLE" in client.capabilities()
        raw = msg(1, "Invoice through the proxy") + b"x" * 5000 + b"\r\n"
        client.append("INBOX", raw)  # a literal, both ways
        client.select_folder("INBOX")
        (uid,) = client.search(["ALL"])
        assert client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"] == raw  # byte for byte

        client.add_gmail_labels([uid], ["Support/Billing"], silent=True)
        client.add_gmail_labels([uid], ["Support/Billing"], silent=True)  # again: nothing changes
        assert ids_in(direct, "Support/Billing") == Counter({"<gm-1@example.com>": 1})
        assert [op.effect for op in proxy.ops] == ["copied", "already"]

        client.remove_gmail_labels([uid], ["\\Inbox"], silent=True)  # Gmail's Archive
        assert ids_in(direct, "INBOX") == Counter()
        client.noop()  # the client's own session hears of it at its next command that may report it
        assert client.search(["ALL"]) == []

        client.idle()  # IDLE's continuation and DONE pass through; new mail is reported
        load_messages(direct, "INBOX", [msg(2, "Password reset")])
        seen = []
        for _ in range(50):
            seen += client.idle_check(timeout=0.2)
            if any(len(r) >= 2 and r[1] == b"EXISTS" for r in seen):
                break
        client.idle_done()
        assert any(len(r) >= 2 and r[1] == b"EXISTS" for r in seen), seen
    finally:
        connection.close(client)


# ---- check and serve refuse the action without X-GM-EXT-1 ---------------------------------------


def test_label_action_needs_x_gm_ext_1_in_check_and_at_serve_start_up(
    proxy: GmailProxy, dovecot: Dovecot, imap_user: tuple[str, str], direct: IMAPClient, tmp_path: Path
) -> None:
    plain = config(tmp_path, account(tmp_path, dovecot.host, dovecot.port, imap_user))
    out = io.StringIO()
    assert run_check(plain, out=out, check_model=False) == 1
    line = next(ln for ln in out.getvalue().splitlines() if "X-GM-EXT-1" in ln)
    assert line.startswith("FAIL") and "not Gmail" in line and 'action = "move"' in line
    with pytest.raises(MailboxError, match="X-GM-EXT-1"):
        watcher(plain).check()  # what `serve` runs on connect

    via = config(tmp_path, account(tmp_path, proxy.host, proxy.port, imap_user))
    out = io.StringIO()
    assert run_check(via, out=out, check_model=False) == 0, out.getvalue()
    assert any(ln.startswith("OK") and "X-GM-EXT-1" in ln for ln in out.getvalue().splitlines())


def test_label_archive_is_refused_for_other_actions() -> None:
    with pytest.raises(ConfigError, match="label_archive = true only applies to action = \"label\""):
        parse_config({"categories": CATEGORIES, "state_path": "/tmp/s.db", "accounts": [
            {"name": "a", "host": "h", "username": "u", "password_env": "P", "action": "move", "label_archive": True}]})


# ---- filing with labels --------------------------------------------------------------------------


@pytest.mark.parametrize("archive", [False, True])
def test_each_message_labelled_once_unsure_gets_its_label(
    proxy: GmailProxy, imap_user: tuple[str, str], direct: IMAPClient, tmp_path: Path, archive: bool
) -> None:
    load_messages(direct, "INBOX", MIXED)
    cfg = config(tmp_path, account(tmp_path, proxy.host, proxy.port, imap_user, label_archive=archive))
    w = watcher(cfg)
    try:
        assert w.process_backlog() == 7
        assert w.process_backlog() == 0  # a second pass labels nothing again
    finally:
        w.close()
    found = where(direct)
    for mid, folder in EXPECTED.items():
        assert found[folder][mid] == 1, (mid, found)
        assert sum(found[f][mid] for f in FOLDERS) == 1, (mid, found)  # one label of ours, no other
    # Without label_archive the mail stays in the inbox, as with Gmail's "Label as"; with it, it leaves.
    assert found["INBOX"] == (Counter() if archive else Counter(dict.fromkeys(EXPECTED, 1)))
    assert len(proxy.added("copied")) == 7 and proxy.added("already") == []
    rows = w.state.rows("gmail")
    assert {(r.action, r.status) for r in rows} == {("label", "done")}
    assert sorted(r.folder for r in rows) == sorted(EXPECTED.values())


class Crash(Exception):
    """Stands for the process dying at this point."""


@pytest.mark.parametrize(
    ("archive", "crash", "recovery"),
    [
        (False, "after_label", "recovered_label_set"),   # labelled, status not written
        (True, "after_label", "recovered_label_set"),    # labelled, not yet archived
        (True, "after_archive", "recovered_already_filed"),  # labelled and archived, status not written
    ],
)
def test_a_crash_mid_batch_does_not_label_twice(
    proxy: GmailProxy, imap_user: tuple[str, str], direct: IMAPClient, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, archive: bool, crash: str, recovery: str,
) -> None:
    load_messages(direct, "INBOX", [msg(1, "Invoice crash"), msg(2, "Password after crash")])
    cfg = config(tmp_path, account(tmp_path, proxy.host, proxy.port, imap_user, label_archive=archive))
    name = "set_label" if crash == "after_label" else "archive"
    real = getattr(actions, name)

    def then_crash(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        monkeypatch.setattr(actions, name, real)
        raise Crash(f"crash after {name}")

    monkeypatch.setattr(actions, name, then_crash)
    w = watcher(cfg)
    with pytest.raises(Crash):
        w.process_backlog()
    w.close()
    assert [r.status for r in w.state.pending("gmail", "INBOX")] == ["pending"]

    restarted = watcher(cfg)
    try:
        with structlog.testing.capture_logs() as logs:
            restarted.connect()  # recovery runs on connect
        assert [e["event"] for e in logs if e["event"].startswith("recovered")] == [recovery]
        restarted.process_backlog()
    finally:
        restarted.close()
    found = where(direct)
    assert found["Support/Billing"] == Counter({"<gm-1@example.com>": 1})
    assert found["Support/Login"] == Counter({"<gm-2@example.com>": 1})
    assert sum(found["INBOX"].values()) == (0 if archive else 2)
    assert len(proxy.added("copied")) == 2
    # Recovery redid the whole action where the message was still in the inbox: the label was there.
    assert len(proxy.added("already")) == (1 if crash == "after_label" else 0)
    assert sorted(r.status for r in restarted.state.rows("gmail")) == ["done", "done"]


def test_sigkill_mid_backlog_labels_each_message_once(
    proxy: GmailProxy, dovecot: Dovecot, imap_user: tuple[str, str], tmp_path: Path
) -> None:
    """Real worker processes through the proxy, SIGKILLed right after an action, right before one and
    at a random time, restarted each time (testing/killproof.py), with label_archive so that every
    message ends in exactly one place the proof can count."""
    from mailtriage.testing.killproof import KILL_POINTS, run_proof

    class ViaProxy:  # workers connect to the proxy; loading and counting read Dovecot itself
        host, port = proxy.host, proxy.port
        client: Callable[..., IMAPClient] = staticmethod(dovecot.client)  # type: ignore[assignment]

    result = run_proof(ViaProxy(), *imap_user, tmp_path, messages=30, kills=3, fetch_batch=5, seed=5,
                       action="label", label_archive=True)
    assert result.kills_by_point == dict.fromkeys(KILL_POINTS, 1), result.as_dict()
    assert result.ok and (result.lost, result.duplicated, result.decisions_not_one) == (0, 0, 0), result.as_dict()
    assert len(proxy.added("copied")) == 30  # one label added per message, whatever the kills
    # The kills after and before an action each left a 'pending' row that a restart finished.
    assert sum(result.recoveries.values()) >= 2, result.as_dict()

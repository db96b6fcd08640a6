"""Cyrus IMAP 3.6, the second real server: "." between levels and every personal folder under
"INBOX." (Debian's Cyrus; Courier and many hosted servers do the same), while the config keeps
config.example.toml's "/" names. Each test also runs against Dovecot set up with that hierarchy,
so a failure tells a Cyrus quirk from a hierarchy bug."""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from mailtriage.cli.check import run_check
from mailtriage.config import AccountConfig, Config, ModelConfig, load_config
from mailtriage.errors import MailboxError
from mailtriage.imap import connection
from mailtriage.imap.watcher import MailboxWatcher
from mailtriage.store.corrections import scan_corrections
from mailtriage.store.state import StateDB
from mailtriage.testing.cyrus import Cyrus
from mailtriage.testing.dovecot import Dovecot, DovecotError, load_messages
from mailtriage.testing.fakes import KeywordClassifier
from mailtriage.testing.killproof import KILL_POINTS, run_proof

pytestmark = pytest.mark.component

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = load_config(REPO / "config.example.toml")
# Three of the example's categories (one with a space) for the filing tests.
CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login problems", "refunds": "Support/Refunds"}
UNSURE = "Support/Unsure"
ON_SERVER = {"Support/Billing": "INBOX.Support.Billing", "Support/Login problems": "INBOX.Support.Login problems",
             "Support/Refunds": "INBOX.Support.Refunds", UNSURE: "INBOX.Support.Unsure", "INBOX": "INBOX"}
WORDS = {"invoice": "billing", "password": "login", "refund": "refunds"}
# Dovecot with Cyrus's hierarchy; its own template says separator = / with no prefix.
DOVECOT_DOT = "namespace inbox {\n  separator = .\n  prefix = INBOX.\n}\n"

Server = Cyrus | Dovecot


def msg(n: int, subject: str) -> bytes:
    return (
        f"From: Customer {n} <c{n}@example.com>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <cyr-{n}@example.com>\r\nDate: Mon, 6 May 2024 07:08:09 +0200\r\n\r\nHello, {subject}.\r\n"
    ).encode()


MIXED = [msg(1, "Invoice 1 wrong"), msg(2, "Password reset"), msg(3, "Refund please"), msg(4, "Just saying hi"),
         msg(5, "Invoice 5 again"), msg(6, "Refund status"), msg(7, "Password expired")]
EXPECTED = {"INBOX": 0, "Support/Billing": 2, "Support/Login problems": 2, "Support/Refunds": 2, UNSURE: 1}


@pytest.fixture(scope="module")
def dovecot_dot() -> Iterator[Dovecot]:
    server = Dovecot(extra_conf=DOVECOT_DOT)
    message = ""
    try:
        server.start()
    except DovecotError as exc:
        message = str(exc)
    if message:
        server.stop()
        pytest.fail(message, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["cyrus", "dovecot-dot"])
def mailbox(request: pytest.FixtureRequest) -> tuple[Server, str, str]:
    """(server, user, password): a fresh user on Cyrus, or on Dovecot with Cyrus's hierarchy."""
    if request.param == "cyrus":
        server: Server = request.getfixturevalue("cyrus")
        user, password = request.getfixturevalue("cyrus_user")
    else:
        server = request.getfixturevalue("dovecot_dot")
        user, password = f"dot{time.monotonic_ns()}", "dot-secret"
        server.add_user(user, password)
    return server, user, password


@pytest.fixture
def client(mailbox: tuple[Server, str, str]) -> Iterator[IMAPClient]:
    server, user, password = mailbox
    c = server.client(user, password)
    try:
        yield c
    finally:
        connection.close(c)


def _account(tmp_path: Path, mailbox: tuple[Server, str, str], **kw: Any) -> AccountConfig:
    server, user, password = mailbox
    secret = tmp_path / "imap-password"
    secret.write_text(password)
    secret.chmod(0o600)
    fields: dict[str, Any] = {"tls": "none", "idle_timeout": 30, "fetch_batch": 3, "reconnect_max": 1}
    fields.update(kw)
    return AccountConfig(name="acct", host=server.host, port=server.port, username=user, password_file=str(secret),
                         **fields)


def _config(tmp_path: Path, account: AccountConfig, categories: dict[str, str] = CATEGORIES,
            unsure: str = UNSURE) -> Config:
    return Config(categories=categories, unsure_folder=unsure, state_path=str(tmp_path / "state.sqlite3"),
                  accounts=(account,), model=ModelConfig(path=str(tmp_path / "no-model"), threshold=0.6))


def _create(client: IMAPClient, *names: str) -> None:
    for name in names:
        client.create_folder(ON_SERVER[name])


def _message_ids(client: IMAPClient, folder: str) -> Counter[str]:
    client.select_folder(ON_SERVER[folder], readonly=True)
    uids = client.search(["UNDELETED"])
    data = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
    return Counter(d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().split(":", 1)[1].strip() for d in data.values())


def _where(client: IMAPClient) -> dict[str, int]:
    return {folder: sum(_message_ids(client, folder).values()) for folder in EXPECTED}


def _watcher(account: AccountConfig, config: Config) -> MailboxWatcher:
    rules = KeywordClassifier(tuple(CATEGORIES), WORDS, version="kw-cyrus", default="billing")
    return MailboxWatcher(account, "INBOX", config, StateDB(config.state_path), rules, idle_slice=0.2, backoff_start=0.1)


def _wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ---- check ------------------------------------------------------------------------------------


def test_check_create_folders_maps_the_example_names_to_the_servers_hierarchy(
    mailbox: tuple[Server, str, str], client: IMAPClient, tmp_path: Path
) -> None:
    """config.example.toml's 16 "Support/..." folders: CREATE of those names fails on this hierarchy
    ("Invalid mailbox name"); check creates them as INBOX.Support.* and a second check finds them."""
    config = _config(tmp_path, _account(tmp_path, mailbox), dict(EXAMPLE.categories), EXAMPLE.unsure_folder)
    out = io.StringIO()
    assert run_check(config, create_folders=True, out=out, check_model=False) == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    created = [line for line in lines if "was missing: created" in line]
    assert len(created) == 16, out.getvalue()
    assert any("folder 'Support/Billing' (on the server: 'INBOX.Support.Billing')" in line for line in created)
    existing = {name for _f, _d, name in client.list_folders()}
    assert {"INBOX.Support.Billing", "INBOX.Support.Login problems", "INBOX.Support.Unsure"} <= existing
    assert not any(name.startswith("Support") for name in existing)

    again = io.StringIO()
    assert run_check(config, out=again, check_model=False) == 0, again.getvalue()
    assert sum("exists" in line and "INBOX.Support." in line for line in again.getvalue().splitlines()) == 16


def test_check_says_what_to_write_for_a_name_the_hierarchy_cannot_hold(
    mailbox: tuple[Server, str, str], tmp_path: Path
) -> None:
    categories = {**CATEGORIES, "billing": "Support/Billing v1.2"}  # "." would start a sub-folder here
    out = io.StringIO()
    assert run_check(_config(tmp_path, _account(tmp_path, mailbox), categories), create_folders=True, out=out,
                     check_model=False) == 1
    (line,) = [line for line in out.getvalue().splitlines() if line.startswith("FAIL ")]
    assert "uses '.' as separator under 'INBOX.'" in line and "'INBOX.Support.Billing v1.2'" in line


def test_check_refuses_two_names_for_one_server_folder(mailbox: tuple[Server, str, str], tmp_path: Path) -> None:
    categories = {**CATEGORIES, "login": "INBOX.Support.Billing"}  # Support/Billing in the server's spelling
    out = io.StringIO()
    assert run_check(_config(tmp_path, _account(tmp_path, mailbox), categories), create_folders=True, out=out,
                     check_model=False) == 1
    (line,) = [line for line in out.getvalue().splitlines() if line.startswith("FAIL ")]
    assert "'INBOX.Support.Billing'" in line and "is the same server folder as 'Support/Billing'" in line


def test_serve_refuses_to_start_naming_the_servers_hierarchy(
    mailbox: tuple[Server, str, str], client: IMAPClient, tmp_path: Path
) -> None:
    """`serve` applies the same rules on connect: a missing folder is named with the server's
    hierarchy, and a name the server cannot hold says what to write."""
    account = _account(tmp_path, mailbox)
    with pytest.raises(MailboxError) as missing:
        _watcher(account, _config(tmp_path, account)).check()
    assert "do not exist" in str(missing.value) and "uses '.' as separator under 'INBOX.'" in str(missing.value)
    _create(client, *CATEGORIES.values(), UNSURE)
    categories = {**CATEGORIES, "billing": "Support/Billing v1.2"}
    with pytest.raises(MailboxError) as unmappable:
        _watcher(account, _config(tmp_path, account, categories)).check()
    assert "'INBOX.Support.Billing v1.2'" in str(unmappable.value) and "do not exist" not in str(unmappable.value)


# ---- filing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["move", "header", "keyword"])
def test_each_action_files_every_message_exactly_once(
    mailbox: tuple[Server, str, str], client: IMAPClient, tmp_path: Path, action: str
) -> None:
    _create(client, *CATEGORIES.values(), UNSURE)
    load_messages(client, "INBOX", MIXED)
    account = _account(tmp_path, mailbox, action=action)
    w = _watcher(account, _config(tmp_path, account))
    try:
        assert w.process_backlog() == 7
        assert w.process_backlog() == 0
    finally:
        w.close()
    if action == "keyword":  # tagged in place: all still in INBOX, one category keyword each
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags(client.search(["ALL"]))
        tags = Counter(f.decode() for fl in flags.values() for f in fl if f.decode().startswith("mt_"))
        assert tags == {"mt_billing": 2, "mt_login": 2, "mt_refunds": 2, "mt_unsure": 1} and len(flags) == 7, tags
        return
    assert _where(client) == EXPECTED
    every = Counter[str]()
    for folder in EXPECTED:
        every.update(_message_ids(client, folder))
    assert sorted(every) == sorted(f"<cyr-{n}@example.com>" for n in range(1, 8)) and set(every.values()) == {1}
    if action == "header":
        client.select_folder("INBOX.Support.Billing", readonly=True)
        headers = client.fetch(client.search(["ALL"]), ["BODY.PEEK[HEADER]"])
        assert all(b"X-Mailtriage-Category: billing" in d[b"BODY[HEADER]"] for d in headers.values())
    rows = StateDB(str(tmp_path / "state.sqlite3")).rows("acct")
    assert [r.status for r in rows] == ["done"] * 7


def test_idle_sees_new_mail(mailbox: tuple[Server, str, str], client: IMAPClient, tmp_path: Path) -> None:
    _create(client, *CATEGORIES.values(), UNSURE)
    load_messages(client, "INBOX", [msg(1, "Invoice backlog")])
    account = _account(tmp_path, mailbox)
    w = _watcher(account, _config(tmp_path, account))
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    try:
        assert _wait_for(lambda: _where(client)["Support/Billing"] == 1)  # the catch-up
        assert _wait_for(lambda: w._has_idle and w.client is not None and w.client._idle_tag is not None)
        load_messages(client, "INBOX", [msg(2, "Password lost")])        # arrives during IDLE
        # Far below idle_timeout (30 s) and Cyrus's imapidlepoll (60 s): IDLE itself reported it.
        assert _wait_for(lambda: _where(client)["Support/Login problems"] == 1)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_staff_move_counts_as_a_correction(
    mailbox: tuple[Server, str, str], client: IMAPClient, tmp_path: Path
) -> None:
    _create(client, *CATEGORIES.values(), UNSURE)
    load_messages(client, "INBOX", [msg(1, "Invoice 1 wrong"), msg(2, "Password reset")])
    account = _account(tmp_path, mailbox)
    config = _config(tmp_path, account)
    w = _watcher(account, config)
    try:
        assert w.process_backlog() == 2
    finally:
        w.close()
    # Staff: "that was a refund, not billing" — moved in the mail client, in the server's names.
    client.select_folder("INBOX.Support.Billing")
    client.move(client.search(["ALL"]), "INBOX.Support.Refunds")
    state = StateDB(config.state_path)
    found = scan_corrections(lambda acct: connection.connect(acct, timeout=10), config, state)
    assert [(c.predicted, c.actual, c.was_unsure) for c in found] == [("billing", "refunds", False)]
    assert scan_corrections(lambda acct: connection.connect(acct, timeout=10), config, state) == []  # counted once


def test_sigkill_mid_backlog_loses_and_duplicates_nothing(
    mailbox: tuple[Server, str, str], tmp_path: Path
) -> None:
    server, user, password = mailbox
    result = run_proof(server, user, password, tmp_path, messages=30, kills=3, fetch_batch=4, seed=5)
    assert result.kills_by_point == dict.fromkeys(KILL_POINTS, 1) and result.kills_while_filing, result.as_dict()
    assert result.ok and not result.notes, result.as_dict()
    assert (result.lost, result.duplicated, result.decisions_not_one) == (0, 0, 0)
    assert sum(result.per_folder.values()) == 30

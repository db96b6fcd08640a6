"""Proves the real-Dovecot test server behaves as every IMAP test assumes (PEEK, MOVE, IDLE, capabilities)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from imapclient import IMAPClient

import mailtriage.testing.dovecot as dovecot_module
from mailtriage.testing.dovecot import (
    NO_IDLE,
    NO_MOVE,
    Dovecot,
    DovecotError,
    DovecotNotInstalledError,
    imap_capability_without,
    load_folder_tree,
    load_messages,
)

pytestmark = pytest.mark.component

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: support@example.com\r\n"
    b"Subject: Invoice 42 is wrong\r\n"
    b"Message-ID: <invoice-42@example.com>\r\n"
    b"\r\n"
    b"I was charged twice.\r\n"
)


def _message(n: int) -> bytes:
    return MESSAGE.replace(b"Invoice 42", b"Invoice %d" % n).replace(b"invoice-42", b"invoice-%d" % n)


def test_append_then_body_peek_returns_the_bytes_and_leaves_unseen(imap: IMAPClient) -> None:
    [uid] = load_messages(imap, "INBOX", [MESSAGE])

    imap.select_folder("INBOX")
    fetched = imap.fetch([uid], ["BODY.PEEK[]", "FLAGS"])[uid]

    assert fetched[b"BODY[]"] == MESSAGE
    assert b"\\Seen" not in imap.fetch([uid], ["FLAGS"])[uid][b"FLAGS"]


def test_move_to_another_folder_keeps_one_copy_with_a_new_uid(imap: IMAPClient) -> None:
    assert imap.has_capability("MOVE")
    uids = load_messages(imap, "INBOX", [_message(1), _message(2)])
    assert uids == [1, 2]  # a fresh user starts at UID 1: tests do not see each other's mail
    imap.create_folder("Billing")

    imap.select_folder("INBOX")
    imap.move([uids[1]], "Billing")

    assert imap.search(["ALL"]) == [uids[0]]
    imap.select_folder("Billing", readonly=True)
    [moved] = imap.search(["ALL"])
    assert moved == 1
    assert imap.fetch([moved], ["BODY.PEEK[]"])[moved][b"BODY[]"] == _message(2)


def test_idle_sees_a_message_appended_by_another_connection(
    dovecot: Dovecot, imap: IMAPClient, imap_user: tuple[str, str]
) -> None:
    imap.select_folder("INBOX")
    imap.idle()
    try:
        other = dovecot.client(*imap_user)
        try:
            load_messages(other, "INBOX", [MESSAGE])
        finally:
            other.logout()
        deadline = time.monotonic() + 5
        seen: list[tuple[object, ...]] = []
        while time.monotonic() < deadline and not any(r[1:2] == (b"EXISTS",) for r in seen):
            seen += imap.idle_check(timeout=0.5)
    finally:
        imap.idle_done()
    assert (1, b"EXISTS") in seen


def test_factory_server_can_drop_move_or_idle(dovecot_factory: Callable[..., Dovecot]) -> None:
    no_move = dovecot_factory(extra_conf=NO_MOVE)
    no_idle = dovecot_factory(extra_conf=NO_IDLE, users={"ops": "pw"})

    client = no_move.client()
    try:
        assert not client.has_capability("MOVE")
        assert client.has_capability("IDLE") and client.has_capability("UIDPLUS")
    finally:
        client.logout()
    client = no_idle.client("ops")
    try:
        assert not client.has_capability("IDLE")
        assert client.has_capability("MOVE")
    finally:
        client.logout()


def test_load_folder_tree_creates_one_folder_per_category(
    dovecot: Dovecot, imap: IMAPClient, imap_user: tuple[str, str], tmp_path: Path
) -> None:
    for category, count in {"Billing": 2, "Shipping": 1}.items():
        (tmp_path / category).mkdir()
        for n in range(count):
            (tmp_path / category / f"{n}.eml").write_bytes(_message(n))
    (tmp_path / "Billing" / ".hidden").write_bytes(b"not mail")

    counts = load_folder_tree(dovecot, tmp_path, prefix="Support/", user=imap_user[0])

    assert counts == {"Support/Billing": 2, "Support/Shipping": 1}
    assert imap.folder_status("Support/Billing", [b"MESSAGES"])[b"MESSAGES"] == 2
    assert imap.folder_status("Support/Shipping", [b"MESSAGES"])[b"MESSAGES"] == 1


def test_load_messages_sets_flags_and_refuses_missing_folder_without_create(imap: IMAPClient) -> None:
    [uid] = load_messages(imap, "Triage", MESSAGE, flags=[b"\\Seen", b"$Billing"])
    imap.select_folder("Triage", readonly=True)
    assert set(imap.get_flags([uid])[uid]) >= {b"\\Seen", b"$Billing"}

    with pytest.raises(DovecotError, match="does not exist"):
        load_messages(imap, "Nowhere", [MESSAGE], create=False)


def test_capability_helper_rejects_unknown_names() -> None:
    assert "MOVE" not in NO_MOVE.split() and "IDLE" in NO_MOVE.split()
    with pytest.raises(ValueError, match="XNOPE"):
        imap_capability_without("XNOPE")


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dovecot_module, "_find_binary", lambda name: None)
    with pytest.raises(DovecotNotInstalledError, match="apt-get install -y dovecot-imapd"):
        Dovecot().start()


def test_bad_config_fails_fast_with_dovecots_own_words() -> None:
    server = Dovecot(extra_conf="no_such_setting = 1\n")
    try:
        with pytest.raises(DovecotError, match="no_such_setting"):
            server.start()
    finally:
        server.stop()

"""Actions and connections against a real Dovecot: move (and its fallback), keyword, header rewrite,
and the clear errors for what can go wrong; plus the small pure helpers (tagging: tests/test_tagging.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from imapclient import DELETED, SEEN, IMAPClient

from imapclient import exceptions as imap_exc

from mailtriage.imap import actions, refusals

from mailtriage.imap import connection
from mailtriage.config import AccountConfig
from mailtriage.errors import MailboxError
from mailtriage.core.routing import Decision
from mailtriage.testing.builders import mail
from mailtriage.testing.dovecot import NO_MOVE, Dovecot, imap_capability_without, load_messages
from tests.test_tagging import BILLING, RAW, UNSURE  # one sample with forged X-Mailtriage-* headers

pure = pytest.mark.pure
component = pytest.mark.component


def _msg(n: int, subject: str = "Invoice") -> bytes:
    return mail(f"body {n}", f"{subject} {n}", sender=f"c{n}@example.com",
                message_id=f"<m{n}-{subject.replace(' ', '')}@example.com>")


# ---- pure helpers ---------------------------------------------------------------------------


@pure
@pytest.mark.parametrize(
    ("decision", "expected"),
    [(BILLING, "mt_billing"), (UNSURE, "mt_unsure"), (Decision("a b(c)", 0.9, False, "F"), "mt_a_b_c_")],
)
def test_keyword_for(decision: Decision, expected: str) -> None:
    assert actions.keyword_for("mt_", decision) == expected


@pure
def test_small_parsers() -> None:
    assert actions.appended_uid(b"[APPENDUID 1700000000 42] Append completed.") == 42
    assert actions.appended_uid(b"Append completed.") is None
    assert actions.append_flags([b"\\Seen", b"\\Recent", "$label1"]) == [b"\\Seen", b"$label1"]


@pure
@pytest.mark.parametrize(
    ("text", "transient"),
    [
        ("MOVE failed: [INUSE] Mailbox is locked", True),
        ("APPEND failed: [OVERQUOTA] Quota exceeded", True),
        ("STATUS failed: Internal error occurred", True),  # no code: retried, with a bounded count
        ("STORE failed: [NOPERM] Permission denied", False),
        ("select command error: BAD [b'Error in IMAP command']", False),
    ],
)
def test_refusal_error_says_whether_a_retry_can_help(text: str, transient: bool) -> None:
    err = refusals.refusal_error("X", imap_exc.IMAPClientError(text), "Support/Billing")
    assert err.transient is transient and err.folder == "Support/Billing"
    assert str(err) == f"X failed: {text}"


@pure
def test_map_refusals_passes_connection_errors_through() -> None:
    with pytest.raises(imap_exc.IMAPClientAbortError):
        with refusals.map_refusals("MOVE", "F"):
            raise imap_exc.IMAPClientAbortError("socket error: EOF")
    with pytest.raises(ConnectionResetError):
        with refusals.map_refusals("MOVE", "F"):
            raise ConnectionResetError()
    with pytest.raises(MailboxError, match=r"^MOVE failed: \[INUSE\] busy$") as info:
        with refusals.map_refusals("MOVE", "F"):
            raise imap_exc.IMAPClientError("[INUSE] busy")
    assert info.value.transient and isinstance(info.value.__cause__, imap_exc.IMAPClientError)


# ---- real server ----------------------------------------------------------------------------


def _folder_uids(client: IMAPClient, folder: str) -> list[int]:
    client.select_folder(folder, readonly=True)
    return list(client.search(["ALL"]))


@component
def test_move_with_move_capability_keeps_flags(imap: IMAPClient) -> None:
    imap.create_folder("Support/Billing")
    uid, other = load_messages(imap, "INBOX", [_msg(1), _msg(2)])
    imap.select_folder("INBOX")
    actions.move(imap, uid, "Support/Billing", has_move=True, has_uidplus=True)
    assert _folder_uids(imap, "INBOX") == [other]
    (moved,) = _folder_uids(imap, "Support/Billing")
    assert SEEN not in imap.get_flags([moved])[moved]


@component
def test_move_to_missing_folder_is_a_clear_error(imap: IMAPClient) -> None:
    (uid,) = load_messages(imap, "INBOX", [_msg(1)])
    imap.select_folder("INBOX")
    with pytest.raises(MailboxError, match=r"destination folder 'Support/Nope' does not exist") as info:
        actions.move(imap, uid, "Support/Nope", has_move=True, has_uidplus=True)
    # Retrying cannot help until someone creates the folder: the caller gives up, not retries.
    assert info.value.transient is False and info.value.folder == "Support/Nope"
    with pytest.raises(MailboxError, match=r"does not exist"):
        actions.move(imap, uid, "Support/Nope", has_move=False, has_uidplus=True)
    assert _folder_uids(imap, "INBOX") == [uid]
    with pytest.raises(MailboxError, match=r"Support/Nope"):
        connection.check_folders(imap, ["INBOX", "Support/Nope"], "acct")


@component
def test_move_fallback_expunges_only_its_own_uid(dovecot_factory: Callable[..., Dovecot]) -> None:
    server = dovecot_factory(extra_conf=NO_MOVE)
    client = server.client()
    try:
        assert not client.has_capability("MOVE") and client.has_capability("UIDPLUS")
        client.create_folder("Support/Billing")
        uid, trashed = load_messages(client, "INBOX", [_msg(1), _msg(2)])
        client.select_folder("INBOX")
        client.add_flags([trashed], [DELETED])  # someone else's pending deletion
        actions.move(client, uid, "Support/Billing", has_move=False, has_uidplus=True)
        assert _folder_uids(client, "INBOX") == [trashed]  # still there, still \Deleted
        assert len(_folder_uids(client, "Support/Billing")) == 1
    finally:
        client.logout()


@component
def test_move_without_move_or_uidplus_is_refused_before_copy(dovecot_factory: Callable[..., Dovecot]) -> None:
    server = dovecot_factory(extra_conf=imap_capability_without("MOVE", "UIDPLUS"))
    client = server.client()
    try:
        client.create_folder("Support/Billing")
        (uid,) = load_messages(client, "INBOX", [_msg(1)])
        client.select_folder("INBOX")
        with pytest.raises(MailboxError, match="UIDPLUS"):
            actions.move(client, uid, "Support/Billing", has_move=False, has_uidplus=False)
        assert _folder_uids(client, "Support/Billing") == []
        assert _folder_uids(client, "INBOX") == [uid]
    finally:
        client.logout()


@component
def test_set_keyword_only_adds_the_keyword(imap: IMAPClient) -> None:
    a, b = load_messages(imap, "INBOX", [_msg(1), _msg(2)])
    imap.select_folder("INBOX")
    assert actions.set_keyword(imap, a, BILLING, "mt_") == "mt_billing"
    assert actions.set_keyword(imap, b, UNSURE, "mt_") == "mt_unsure"
    flags = {uid: set(f) - {b"\\Recent"} for uid, f in imap.get_flags([a, b]).items()}
    assert flags == {a: {b"mt_billing"}, b: {b"mt_unsure"}}


@component
def test_rewrite_header_preserves_flags_and_date(imap: IMAPClient) -> None:
    imap.create_folder("Support/Billing")
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    imap.append("INBOX", RAW, flags=[SEEN, b"$custom"], msg_time=when)
    imap.normalise_times = False
    info = imap.select_folder("INBOX")
    (uid,) = imap.search(["ALL"])
    data = imap.fetch([uid], ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])[uid]
    new_uid = actions.rewrite_header(
        imap, uid, data[b"BODY[]"], data[b"FLAGS"], data[b"INTERNALDATE"], BILLING, "INBOX",
        source_uidvalidity=int(info[b"UIDVALIDITY"]),
    )
    assert _folder_uids(imap, "INBOX") == []  # the original is gone
    assert _folder_uids(imap, "Support/Billing") == [new_uid]
    copy = imap.fetch([new_uid], ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])[new_uid]
    assert copy[b"BODY[]"].startswith(b"X-Mailtriage-Category: billing\r\nX-Mailtriage-Confidence: 0.8765\r\n")
    assert copy[b"BODY[]"].count(b"X-Mailtriage-Category") == 2  # ours + the one in the body
    assert set(copy[b"FLAGS"]) - {b"\\Recent"} == {SEEN, b"$custom"}
    assert copy[b"INTERNALDATE"] == when


@pure
def test_rewrite_header_refuses_without_uidplus() -> None:
    with pytest.raises(MailboxError, match="UIDPLUS"):
        actions.rewrite_header(None, 1, RAW, (), None, BILLING, "INBOX", has_uidplus=False)  # type: ignore[arg-type]


# ---- connect ---------------------------------------------------------------------------------


def _account(dovecot: Dovecot, user: str, password: str, tmp_path: Path, **kw: object) -> AccountConfig:
    secret = tmp_path / f"{user}.secret"
    secret.write_text(password + "\n")
    defaults: dict[str, object] = {"port": dovecot.port, "tls": "none", "password_file": str(secret)}
    defaults.update(kw)
    return AccountConfig(name="acct", host=dovecot.host, username=user, **defaults)  # type: ignore[arg-type]


@component
@pytest.mark.parametrize("auth", ["login", "plain"])
def test_connect_logs_in(dovecot: Dovecot, imap_user: tuple[str, str], tmp_path: Path, auth: str) -> None:
    client = connection.connect(_account(dovecot, *imap_user, tmp_path, auth=auth), timeout=5)
    try:
        assert client.normalise_times is False
        client.select_folder("INBOX")
        connection.require_capabilities(client, ["IDLE", "UIDPLUS"])
        with pytest.raises(MailboxError, match="lacks X-NOPE"):
            connection.require_capabilities(client, ["X-NOPE"])
    finally:
        connection.close(client)


@component
def test_a_literal_larger_than_max_message_bytes_is_cut_and_the_connection_stays_in_step(
    dovecot: Dovecot, imap_user: tuple[str, str], tmp_path: Path
) -> None:
    """A server may answer a fetch with far more than was asked (a partial fetch is
    only a request); the client keeps max_message_bytes and drains the rest without holding it."""
    limit = 1024 * 1024
    big = b"Subject: huge\r\nMessage-ID: <huge@example.com>\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3000  # ~3 MB
    small = b"Subject: small\r\nMessage-ID: <small@example.com>\r\n\r\nhello\r\n"
    client = connection.connect(_account(dovecot, *imap_user, tmp_path, max_message_bytes=limit), timeout=10)
    try:
        client.create_folder("Huge")
        load_messages(client, "Huge", [big, small])
        client.select_folder("Huge")
        uids = sorted(client.search(["ALL"]))
        got = client.fetch(uids, [b"BODY.PEEK[]", b"RFC822.SIZE"])  # whole messages: as a hostile server sends
        assert got[uids[0]][b"RFC822.SIZE"] == len(big) > limit
        assert got[uids[0]][b"BODY[]"] == big[:limit]  # cut at the limit ...
        assert got[uids[1]][b"BODY[]"] == small  # ... and the next literal in the same response is intact
        assert client.noop()  # still in step with the server
    finally:
        connection.close(client)


@component
def test_connect_wrong_password(dovecot: Dovecot, imap_user: tuple[str, str], tmp_path: Path) -> None:
    user, _ = imap_user
    with pytest.raises(MailboxError, match=rf"login as '{user}' \(login\) refused by server.*password_file"):
        connection.connect(_account(dovecot, user, "wrong", tmp_path), timeout=5)


@component
def test_connect_unreachable(tmp_path: Path, dovecot: Dovecot, imap_user: tuple[str, str]) -> None:
    account = _account(dovecot, *imap_user, tmp_path, port=1)
    with pytest.raises(MailboxError, match=r"cannot connect to 127.0.0.1:1: .*is the server running\? check accounts\['acct'\].host/port"):
        connection.connect(account, timeout=5)


@component
def test_connect_tls_mismatches(dovecot: Dovecot, imap_user: tuple[str, str], tmp_path: Path) -> None:
    # The test server speaks plain IMAP only: both TLS modes must fail with a message naming tls.
    with pytest.raises(MailboxError, match="STARTTLS"):
        connection.connect(_account(dovecot, *imap_user, tmp_path, tls="starttls"), timeout=5)
    with pytest.raises(MailboxError, match=r"TLS handshake with 127.0.0.1:\d+ failed"):
        connection.connect(_account(dovecot, *imap_user, tmp_path, tls="implicit"), timeout=5)


@pure
def test_ssl_context_verifies_by_default(tmp_path: Path) -> None:
    import ssl

    secret = tmp_path / "s"
    secret.write_text("x")
    acct = AccountConfig(name="a", host="h", username="u", password_file=str(secret))
    ctx = connection.ssl_context(acct)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    off = connection.ssl_context(AccountConfig(name="a", host="h", username="u", password_file=str(secret), verify_tls=False))
    assert off.verify_mode == ssl.CERT_NONE
    with pytest.raises(MailboxError, match="ca_file"):
        connection.ssl_context(AccountConfig(name="a", host="h", username="u", password_file=str(secret), ca_file=str(tmp_path / "none.pem")))

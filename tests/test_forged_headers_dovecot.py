"""Forged X-Mailtriage-* names against a real Dovecot: what Dovecot reads as a category field after
the IMAP header action must be ours alone (Dovecot drops a NUL in a field name; Python's parser
does not, so only the real server shows the forgery)."""

from __future__ import annotations

import os
import secrets

import pytest
from imapclient import IMAPClient

from mailtriage.imap import actions
from mailtriage.testing.dovecot import Dovecot
from tests.test_tagging import BILLING

pytestmark = pytest.mark.component

# (forged line, whether Dovecot 2.3 itself reads it as an X-Mailtriage-Category field)
FORGED_NAMES = [
    (b"X-Mailtriage-Category\x00: refunds", True),
    (b"X-Mailtriage-Category\x00\x00 : refunds", True),
    (b"\x00X-Mailtriage-Category: refunds", False),
    (b"X-Mailtriage-Category \x00: refunds", False),
]


def _deliver(dovecot: Dovecot, user: str, raw: bytes) -> None:
    """Put a message into INBOX the way a local delivery agent does (IMAP APPEND refuses NUL)."""
    new = dovecot.root / "home" / user / "Maildir" / "new"
    path = new / f"{secrets.token_hex(8)}.forged.test"
    path.write_bytes(raw)
    if os.geteuid() == 0:
        os.chown(path, dovecot._uid, dovecot._gid)  # noqa: SLF001 - the mail files belong to Dovecot's user


@pytest.mark.parametrize(("line", "dovecot_reads_it"), FORGED_NAMES,
                         ids=["nul-before-colon", "two-nuls-blank", "nul-first", "blank-nul"])
def test_header_action_leaves_dovecot_only_our_category(
    dovecot: Dovecot, imap_user: tuple[str, str], imap: IMAPClient, line: bytes, dovecot_reads_it: bool
) -> None:
    user, _password = imap_user
    imap.create_folder("Support/Billing")
    imap.select_folder("INBOX")  # creates the Maildir
    raw = (b"From: customer@example.com\r\nTo: support@example.com\r\n" + line +
           b"\r\nSubject: where is my refund\r\nMessage-ID: <forged@example.com>\r\n\r\nplease refund\r\n")
    _deliver(dovecot, user, raw)
    info = imap.select_folder("INBOX")
    (uid,) = imap.search(["ALL"])
    # The threat is real: Dovecot drops the NUL and files by this forged field.
    assert imap.search(["HEADER", "X-Mailtriage-Category", "refunds"]) == ([uid] if dovecot_reads_it else [])
    fetched = imap.fetch([uid], ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])[uid]
    new_uid = actions.rewrite_header(
        imap, uid, fetched[b"BODY[]"], fetched[b"FLAGS"], fetched[b"INTERNALDATE"], BILLING, "INBOX",
        source_uidvalidity=int(info[b"UIDVALIDITY"]),
    )
    imap.select_folder("Support/Billing", readonly=True)
    assert imap.search(["HEADER", "X-Mailtriage-Category", "refunds"]) == []
    assert imap.search(["HEADER", "X-Mailtriage-Category", "billing"]) == [new_uid]
    fields = imap.fetch([new_uid], ["BODY.PEEK[HEADER.FIELDS (X-Mailtriage-Category)]"])[new_uid]
    assert fields[b"BODY[HEADER.FIELDS (X-MAILTRIAGE-CATEGORY)]"].strip() == b"X-Mailtriage-Category: billing"
    # FETCH hands the NUL out as 0x80, which Dovecot no longer reads as a name; another server may.
    # The forged line itself must be gone from the copy, whatever the server made of it.
    copy = imap.fetch([new_uid], ["BODY.PEEK[]"])[new_uid][b"BODY[]"]
    assert b"refunds\r\n" not in copy.split(b"\r\n\r\n", 1)[0] + b"\r\n"

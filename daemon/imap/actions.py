"""Decision -> IMAP: move, keyword, header rewrite or Gmail label of one message, never losing or doubling it.

Every function takes a logged-in client with the source mailbox selected read-write and leaves it
selected again on return. IMAP refusals become MailboxError (the message stays where it was);
connection errors pass through unchanged so the watcher reconnects and finishes the job from the
state database. The header rewrite tags with ``mailtriage.core.tagging`` (shared with the SMTP
filter), so the copy is the original plus two lines. Folder names are the configured ones; each
meets the server through ``namespace.server_folder`` (its separator and personal prefix).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime

import structlog
from imapclient import DELETED, IMAPClient

from mailtriage.errors import MailboxError
from mailtriage.core.routing import Decision
from mailtriage.core.tagging import UNSURE, add_headers, header_fingerprint, safe_atom
from mailtriage.imap.namespace import server_folder
from mailtriage.imap.refusals import map_refusals

log = structlog.get_logger(__name__)

ACTIONS = ("move", "keyword", "header", "label")

_RECENT = b"\\Recent"
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)


# ---- pure helpers (header tagging lives in mailtriage.core.tagging) ---------------------


def mailbox_label(mailbox: str) -> str:
    """The Gmail label that puts a message in ``mailbox``: INBOX is the system label \\Inbox, any
    other folder is the label of the same name."""
    return "\\Inbox" if mailbox.upper() == "INBOX" else mailbox


def keyword_for(prefix: str, decision: Decision) -> str:
    """One keyword per category (prefix+label); below threshold only prefix+"unsure"."""
    return prefix + safe_atom(UNSURE if decision.unsure else decision.label)


def appended_uid(response: bytes | str | None) -> int | None:
    """The UID from an APPEND response's [APPENDUID v uid] (UIDPLUS), if any."""
    if response is None:
        return None
    data = response if isinstance(response, bytes) else response.encode()
    m = _APPENDUID.search(data)
    return int(m.group(2)) if m else None


def append_flags(flags: Iterable[bytes | str]) -> list[bytes]:
    """Flags an APPENDed copy can carry: all but \\Recent (only the server may set it)."""
    out = []
    for f in flags:
        b = f if isinstance(f, bytes) else f.encode()
        if b.lower() != _RECENT.lower():
            out.append(b)
    return out


# ---- IMAP edge -----------------------------------------------------------------------------


def select_source(client: IMAPClient, mailbox: str, uidvalidity: int | None, *, readonly: bool = False) -> dict:
    """(Re)select the source mailbox; refuse to go on if its UIDVALIDITY changed under us,
    because then our UIDs would name other messages."""
    with map_refusals(f"SELECT {mailbox!r}", mailbox):
        info = client.select_folder(server_folder(client, mailbox), readonly=readonly)
    current = int(info.get(b"UIDVALIDITY", 0))
    if uidvalidity is not None and current != uidvalidity:
        raise MailboxError(
            f"UIDVALIDITY of {mailbox!r} changed from {uidvalidity} to {current} while acting; "
            "the watcher will rescan it by Message-ID"
        )
    return info


def uid_exists(client: IMAPClient, uid: int) -> bool:
    """Is ``uid`` in the selected mailbox (and not already flagged \\Deleted by us)?"""
    with map_refusals(f"SEARCH UID {uid}"):
        found = client.search(["UID", str(uid), "UNDELETED"])
    return uid in found


def delete_original(client: IMAPClient, uid: int, has_uidplus: bool) -> None:
    """Flag \\Deleted and UID EXPUNGE exactly this UID; never a plain EXPUNGE, which would also
    remove every other message someone flagged \\Deleted in the mailbox."""
    if not has_uidplus:
        raise MailboxError(
            f"cannot remove uid={uid} from the source mailbox: the server has neither MOVE nor UIDPLUS, "
            "and a plain EXPUNGE would also delete other messages flagged \\Deleted. Use action = "
            "\"keyword\" on this server, or enable MOVE/UIDPLUS"
        )
    with map_refusals(f"UID EXPUNGE uid={uid}"):
        client.add_flags([uid], [DELETED], silent=True)
        client.uid_expunge([uid])


def move(client: IMAPClient, uid: int, folder: str, has_move: bool, has_uidplus: bool) -> None:
    """MOVE, or COPY + \\Deleted + UID EXPUNGE when MOVE is missing (refused without UIDPLUS)."""
    if has_move:
        with map_refusals(f"MOVE uid={uid} to {folder!r}", folder):
            client.move([uid], server_folder(client, folder))
        return
    if not has_uidplus:
        # Check before COPY: a copy we could not then remove would be a duplicate.
        raise MailboxError(
            f"cannot move uid={uid} to {folder!r}: the server lacks MOVE, and the COPY+EXPUNGE fallback "
            "needs UIDPLUS (UID EXPUNGE) so that other messages flagged \\Deleted are never expunged. "
            "Use action = \"keyword\" on this server, or enable MOVE or UIDPLUS"
        )
    with map_refusals(f"COPY uid={uid} to {folder!r}", folder):
        client.copy([uid], server_folder(client, folder))
    delete_original(client, uid, has_uidplus)


def set_keyword(client: IMAPClient, uid: int, decision: Decision, prefix: str) -> str:
    """Add the category keyword (or prefix+"unsure"); idempotent, so a retry after a crash is safe."""
    keyword = keyword_for(prefix, decision)
    with map_refusals(f"STORE +FLAGS {keyword} uid={uid}"):
        client.add_flags([uid], [keyword.encode()], silent=True)
    return keyword


def set_label(client: IMAPClient, uid: int, label: str) -> None:
    """Add the Gmail label (the category or unsure folder's name); adding a label a message already
    has changes nothing, so a retry after a crash never files it twice."""
    with map_refusals(f"STORE +X-GM-LABELS ({label}) uid={uid}", label):
        client.add_gmail_labels([uid], [label], silent=True)


def archive(client: IMAPClient, uid: int, mailbox: str) -> None:
    """Remove the watched mailbox's label (Gmail's Archive): the message leaves ``mailbox`` and keeps
    its other labels. Removing a label it no longer has changes nothing either."""
    label = mailbox_label(mailbox)
    with map_refusals(f"STORE -X-GM-LABELS ({label}) uid={uid}"):
        client.remove_gmail_labels([uid], [label], silent=True)


def find_copy(
    client: IMAPClient, folder: str, fingerprint: str, since_uid: int = 1, uid_hint: int | None = None
) -> int | None:
    """UID of the message in ``folder`` whose header fingerprint matches, looking only at UIDs
    >= ``since_uid`` (the folder's UIDNEXT before we acted). Leaves ``folder`` selected read-only."""
    with map_refusals(f"looking for the copy in {folder!r}", folder):
        client.select_folder(server_folder(client, folder), readonly=True)
        if uid_hint is not None:
            candidates = [uid_hint]
        else:
            candidates = [u for u in client.search(["UID", f"{max(since_uid, 1)}:*"]) if u >= since_uid]
        for start in range(0, len(candidates), 200):
            chunk = candidates[start : start + 200]
            data = client.fetch(chunk, ["BODY.PEEK[HEADER]"])
            for uid in chunk:
                header = data.get(uid, {}).get(b"BODY[HEADER]")
                if header is not None and header_fingerprint(header) == fingerprint:
                    return uid
    if uid_hint is not None:  # APPENDUID named another message (should not happen): look properly
        return find_copy(client, folder, fingerprint, since_uid)
    return None


def folder_uidnext(client: IMAPClient, folder: str) -> tuple[int, int]:
    """(UIDVALIDITY, UIDNEXT) of ``folder``: recorded before acting so a crash recovery only scans
    the destination's newer messages."""
    with map_refusals(f"STATUS {folder!r}", folder):
        st = client.folder_status(server_folder(client, folder), [b"UIDVALIDITY", b"UIDNEXT"])
    return int(st[b"UIDVALIDITY"]), int(st[b"UIDNEXT"])


def rewrite_header(
    client: IMAPClient,
    uid: int,
    raw: bytes,
    flags: Sequence[bytes | str],
    internaldate: datetime | None,
    decision: Decision,
    source: str,
    *,
    source_uidvalidity: int | None = None,
    has_uidplus: bool = True,
    dest_uidnext: int | None = None,
    max_bytes: int | None = None,
    why: str | None = None,
) -> int:
    """APPEND a tagged copy to ``decision.folder`` (same flags and INTERNALDATE), verify it is
    there, then remove the original. Returns the copy's UID.

    ``max_bytes``: the account's max_message_bytes. The connection keeps at most that much of any
    message (``connection.cap_literals``), so ``raw`` of that length may be cut: refused, never copied.
    ``why``: the opt-in X-Mailtriage-Why value (``tagging.tag_fields``).
    """
    if max_bytes is not None and len(raw) >= max_bytes:
        raise MailboxError(
            f"uid={uid} is at least {len(raw)} bytes, the account's max_message_bytes: too large to "
            "rewrite with headers, so it was left where it is untouched; raise max_message_bytes "
            "(memory) or file it by hand"
        )
    if not has_uidplus:
        raise MailboxError(
            f"cannot rewrite headers of uid={uid}: removing the original needs UIDPLUS (UID EXPUNGE), "
            "which this server lacks; a plain EXPUNGE would delete other messages flagged \\Deleted. "
            "Use action = \"keyword\" or \"move\" on this server"
        )
    tagged = add_headers(raw, decision, why)
    folder = decision.folder
    if dest_uidnext is None:
        _validity, dest_uidnext = folder_uidnext(client, folder)
    with map_refusals(f"APPEND tagged copy of uid={uid} to {folder!r}", folder):
        response = client.append(server_folder(client, folder), tagged, flags=append_flags(flags), msg_time=internaldate)
    new_uid = find_copy(client, folder, header_fingerprint(raw), dest_uidnext, appended_uid(response))
    select_source(client, source, source_uidvalidity)
    if new_uid is None:
        # Never delete an original whose copy we cannot see.
        raise MailboxError(
            f"APPEND of the tagged copy of uid={uid} to {folder!r} was answered OK but the copy is not "
            "there; the original was kept"
        )
    delete_original(client, uid, has_uidplus)
    return new_uid

"""Crash recovery: finish or settle the actions a crash (or a lost connection) interrupted.

The watcher writes a 'pending' row before it acts (imap/watcher.py); after a restart each pending
row is looked up where it can be — still in the source mailbox (same UIDVALIDITY) and/or as a copy
in its destination (by header fingerprint, above the destination's UIDNEXT recorded before acting)
— and ends in exactly one place: the copy kept and the original removed, the action redone, or the
row marked failed when the message left both.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from mailtriage.core.mailtext import content_fingerprint, message_key
from mailtriage.core.routing import Decision
from mailtriage.errors import MailboxError
from mailtriage.imap import actions
from mailtriage.store.state import MessageRow

if TYPE_CHECKING:
    from mailtriage.imap.watcher import MailboxWatcher, _Fetched

log = structlog.get_logger(__name__)


def recover_pending(w: MailboxWatcher) -> int:
    """Finish or settle every pending row of ``w``'s mailbox; each message ends in one place."""
    rows = w.state.pending(w.account.name, w.mailbox)
    for row in rows:
        recover(w, row)
    if rows:
        w.select()
    return len(rows)


def locate(w: MailboxWatcher, row: MessageRow) -> tuple[bool, int | None]:
    """(is the UID still in the source mailbox, UID of its copy in the destination or None)."""
    client = w._client()
    assert w.uidvalidity is not None
    in_source = row.uidvalidity == w.uidvalidity and actions.uid_exists(client, row.uid)
    copy = None
    if row.action in ("move", "header") and row.folder and row.fingerprint:
        try:
            since = 1
            if row.dest_uidnext is not None:
                dest_validity, _next = actions.folder_uidnext(client, row.folder)
                since = row.dest_uidnext if dest_validity == row.dest_uidvalidity else 1
            copy = actions.find_copy(client, row.folder, row.fingerprint, since)
        except MailboxError as exc:
            # The destination cannot even be examined (e.g. it does not exist): no copy there.
            w.log.warning("destination_unreadable", folder=row.folder, uid=row.uid, error=str(exc))
        actions.select_source(client, w.mailbox, w.uidvalidity)
    return in_source, copy


def recover(w: MailboxWatcher, row: MessageRow) -> str:
    """Settle one pending row; returns its status now (done, failed or still pending)."""
    client = w._client()
    bound = w.log.bind(uid=row.uid, message_id=row.key, action=row.action, folder=row.folder)
    decision = Decision(row.label or "", row.confidence or 0.0, row.unsure, row.folder or w.mailbox)
    in_source, copy = False, None
    try:
        in_source, copy = locate(w, row)
        if row.action == "keyword":
            if in_source:
                actions.set_keyword(client, row.uid, decision, w.account.keyword_prefix)
                return _settle(w, row, "done", bound, "recovered_keyword_set")
            return _settle(w, row, "failed", bound, "recovered_vanished", "message left the mailbox before it was tagged")
        if copy is not None and in_source:
            # The copy exists (COPY or APPEND done) but the original was not removed yet.
            actions.delete_original(client, row.uid, w._has_uidplus)
            return _settle(w, row, "done", bound, "recovered_original_removed", copy_uid=copy)
        if copy is not None:
            return _settle(w, row, "done", bound, "recovered_already_filed", copy_uid=copy)
        if in_source:
            item = refetch(w, row.uid) if row.action == "header" else None
            w._act(row.action, row.uid, decision, item, row.uidvalidity)
            return _settle(w, row, "done", bound, "recovered_redone")
        return _settle(
            w, row, "failed", bound, "recovered_vanished",
            "message is neither in the source mailbox (same UIDVALIDITY) nor in its destination; "
            "someone moved or deleted it, or UIDVALIDITY changed (it will be seen again by Message-ID)",
        )
    except MailboxError as exc:
        # Copy made but original not removable: stay 'pending', so the next connect tries again.
        # Otherwise the message is in the source only: retried after a backoff (issue 8 item 2).
        status = "pending" if copy is not None and in_source else "failed"
        bound.error("recovery_failed", error=str(exc), status=status)
        if status == "failed":
            w.failed_attempt(row.uid, row.uidvalidity, str(exc))
        else:
            w.state.set_status(w.account.name, w.mailbox, row.uidvalidity, row.uid, status, str(exc))
        return status


def _settle(w: MailboxWatcher, row: MessageRow, status: str, bound: Any, event: str, error: str | None = None, **kw: Any) -> str:
    w.state.set_status(w.account.name, w.mailbox, row.uidvalidity, row.uid, status, error)
    (bound.info if status == "done" else bound.warning)(event, status=status, **kw)
    return status


def refetch(w: MailboxWatcher, uid: int) -> _Fetched:
    """The whole message again (the header action copies it byte for byte)."""
    from mailtriage.imap.watcher import _DATE, _FLAGS, _Fetched

    client = w._client()
    data = client.fetch([uid], ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]).get(uid)
    if data is None:
        raise MailboxError(f"uid={uid} vanished from {w.mailbox!r} during recovery")
    raw = data[b"BODY[]"]
    return _Fetched(uid, raw, tuple(data.get(_FLAGS, ())), data.get(_DATE), message_key(raw), time.monotonic(),
                    content_fingerprint(raw))

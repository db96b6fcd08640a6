"""The console's IMAP edge: what waits in the unsure and quarantine folders, and "file as CATEGORY".

Filing from the console is what a drag in the mail client is: an IMAP MOVE into the category's folder,
then the same correction rule the IMAPSieve hook applies (``corrections.learn_moved``), so the lead's
choice counts in live accuracy and is learned at the next retrain. Blocking: call from a worker thread,
one connection per call (imapclient is not thread-safe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailtriage.config import AccountConfig, Config
from mailtriage.core.envelope import Envelope, envelope_of
from mailtriage.core.mailtext import mail_text, message_key
from mailtriage.errors import MailboxError
from mailtriage.imap import actions
from mailtriage.imap.namespace import server_folder
from mailtriage.store.corrections import Correction, learn_moved
from mailtriage.store.state import StateDB

# Newest messages listed per folder; older ones are the mail client's business.
LIMIT = 100
# Bytes read of each listed message: its header and the start of its text, never a large attachment.
_PEEK = 32 * 1024
_PEEK_ITEM = f"BODY.PEEK[]<0.{_PEEK}>".encode()
_FULL_ITEM = b"BODY.PEEK[]"

ClientFactory = Callable[[AccountConfig], Any]


@dataclass(frozen=True)
class Queued:
    uid: int
    key: str
    envelope: Envelope
    snippet: str


@dataclass(frozen=True)
class QueueListing:
    folder: str
    uidvalidity: int
    total: int
    messages: list[Queued]


def _body(data: dict[bytes, Any]) -> bytes:
    for name, value in data.items():
        if name.startswith(b"BODY[") and isinstance(value, bytes):
            return value
    return b""


def list_queue(client: Any, folder: str, snippet_chars: int, limit: int = LIMIT) -> QueueListing:
    """The newest ``limit`` messages of ``folder`` (a "/"-name from the config), newest first."""
    name = server_folder(client, folder)
    if not client.folder_exists(name):
        return QueueListing(folder, 0, 0, [])
    info = client.select_folder(name, readonly=True)
    uidvalidity = int(info.get(b"UIDVALIDITY", 0))
    uids = sorted(client.search(["ALL"])) if int(info.get(b"EXISTS", 0)) else []
    wanted = uids[-limit:]
    out: list[Queued] = []
    fetched = client.fetch(wanted, [_PEEK_ITEM]) if wanted else {}
    for uid in reversed(wanted):
        raw = _body(fetched.get(uid, {}))
        if not raw:
            continue
        key = message_key(raw)
        if key.startswith("sha256:"):  # no Message-ID: the key hashes the whole message
            full = client.fetch([uid], [_FULL_ITEM]).get(uid, {})
            key = message_key(_body(full) or raw)
        snippet = " ".join(mail_text(raw).split())[:snippet_chars] if snippet_chars else ""
        out.append(Queued(uid, key, envelope_of(raw), snippet))
    return QueueListing(folder, uidvalidity, len(uids), out)


def file_as(client: Any, config: Config, account: AccountConfig, state: StateDB, folder: str, uidvalidity: int,
            uid: int, label: str) -> Correction | None:
    """MOVE message ``uid`` of ``folder`` into ``label``'s folder and record the correction, as a drag
    does. MailboxError when the folder changed (another UIDVALIDITY) or the message is gone."""
    if label not in config.categories:
        raise MailboxError(f"{label!r} is not a configured category; expected one of {list(config.categories)}")
    if folder not in (config.unsure_folder, config.quarantine()):
        raise MailboxError(f"{folder!r} is not a queue; the console files from {config.unsure_folder!r} "
                           f"and {config.quarantine()!r} only")
    info = client.select_folder(server_folder(client, folder))
    if int(info.get(b"UIDVALIDITY", 0)) != uidvalidity:
        raise MailboxError(f"{folder!r} was renumbered on the server (UIDVALIDITY {info.get(b'UIDVALIDITY')} "
                           f"instead of {uidvalidity}); reload the queue and file the message again")
    raw = _body(client.fetch([uid], [_FULL_ITEM]).get(uid, {}))
    if not raw:
        raise MailboxError(f"message uid={uid} is no longer in {folder!r} (someone moved it already); "
                           "reload the queue")
    destination = config.categories[label]
    actions.move(client, uid, destination, client.has_capability("MOVE"), client.has_capability("UIDPLUS"))
    return learn_moved(state, config, account, destination, raw)

"""The daemon's memory in one SQLite file (WAL): what was decided for which message, so restarts,
crashes, UIDVALIDITY changes and duplicate deliveries never file a message twice or lose it.

Schema (version 5, in ``PRAGMA user_version``; versions 1 to 4 are migrated on a writable open,
any other version is refused)::

    messages      one row per message the watcher saw, keyed like IMAP keys it
      account, mailbox, uidvalidity, uid   PRIMARY KEY — where the message was when seen
      key            Message-ID (or mailtext's hash of stable headers); indexed per account, so a
                     renumbered (UIDVALIDITY change) or re-delivered message is recognised
      content        mailtext.content_fingerprint: with key, says "the same message" — a different
                     message reusing a Message-ID has another one and is filed, not skipped (v2;
                     NULL on rows from version 1, which then match by key alone)
      fingerprint    sha256 of the header block without X-Mailtriage-* lines: finds the copy in a
                     destination folder after a crash (COPY and APPEND keep these bytes)
      label, confidence, unsure, folder    the decision; folder = where the message was put
                     (the source mailbox for the keyword action)
      action         move | keyword | header | none (skipped duplicate)
      model_version, dry_run
      status         pending (recorded before acting) -> done | failed; skipped (already decided
                     under another UID)
      dest_uidvalidity, dest_uidnext   the destination folder's UIDNEXT just before acting: a
                     crash-recovery scan only has to look at newer UIDs
      attempts, retry_at   a refused action (status failed): how many attempts failed, and when the
                     next one is due (NULL: never retried, e.g. the message vanished) (v3)
      quarantined    1 when retries ran out and the message is (status done) or is to be (status
                     failed, retried at retry_at) in the quarantine folder (v3)
      origin         the login the row's account reaches (core.identity.login_id): rows of every
                     account name with one origin are one mailbox's, so an account renamed, or a
                     second one reaching the same login, never files a message again (v4; NULL on
                     older rows, which match by account alone)
      explanation    why the decision was made, as JSON (core.explain.Explanation: top labels, the
                     part that decided, the threshold, the TF-IDF words), at most 2 KB (v5; NULL on
                     older rows and on rows that are no decision: skipped, poison)
      error, decided_at, updated_at (unix seconds)
    mailbox_state  (account, mailbox, dry_run) PRIMARY KEY -> uidvalidity, last_uid
                     the highest UID fully handled; a dry run keeps its own cursor so switching
                     dry_run off later still files the backlog for real
    corrections    (key, actual) PRIMARY KEY -> account, predicted, was_unsure, corrected_at
                     staff moved a filed message into another category folder (feedback path)
    envelopes      key PRIMARY KEY -> subject, sender, sent (core.envelope: decoded, at most 300
                     characters each): what the web console shows and searches. Created IF NOT EXISTS
                     on any writable open, without a version change: older code ignores the table

Thread safety: one sqlite3 connection per thread (``threading.local``); WAL lets watcher threads
write while ``mailtriage stats`` reads. ``claim`` takes a message in one IMMEDIATE transaction, so
two workers (threads or processes on one database) never both act on one message.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from enum import StrEnum
from typing import Any

from mailtriage.errors import StateError
from mailtriage.core.envelope import Envelope
from mailtriage.core.explain import Explanation
from mailtriage.core.routing import Decision

SCHEMA_VERSION = 5
# user_version -> statements that bring it to the next version (run in one transaction).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE messages ADD COLUMN content TEXT",),
    2: (
        "ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN retry_at REAL",
        "ALTER TABLE messages ADD COLUMN quarantined INTEGER NOT NULL DEFAULT 0",
        # Refused actions of older versions were never retried (stranded in INBOX): retry them now.
        "UPDATE messages SET retry_at = 0 WHERE status = 'failed' AND action IN ('move', 'keyword', 'header')",
    ),
    3: (
        "ALTER TABLE messages ADD COLUMN origin TEXT",
        # A refused quarantine used to be final (the message stranded in the watched mailbox): retry it.
        "UPDATE messages SET retry_at = 0 WHERE status = 'failed' AND quarantined = 1 AND retry_at IS NULL",
    ),
    4: ("ALTER TABLE messages ADD COLUMN explanation TEXT",),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    account TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT,
    content TEXT,
    label TEXT,
    confidence REAL,
    unsure INTEGER NOT NULL DEFAULT 0,
    folder TEXT,
    action TEXT NOT NULL,
    model_version TEXT,
    dry_run INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'skipped')),
    dest_uidvalidity INTEGER,
    dest_uidnext INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    retry_at REAL,
    quarantined INTEGER NOT NULL DEFAULT 0,
    origin TEXT,
    explanation TEXT,
    error TEXT,
    decided_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (account, mailbox, uidvalidity, uid)
);
CREATE INDEX IF NOT EXISTS messages_key ON messages (account, key);
CREATE INDEX IF NOT EXISTS messages_status ON messages (account, mailbox, status);
CREATE INDEX IF NOT EXISTS messages_decided ON messages (decided_at);
CREATE INDEX IF NOT EXISTS messages_origin_key ON messages (origin, key);
CREATE INDEX IF NOT EXISTS messages_origin_uid ON messages (origin, mailbox, uidvalidity, uid);
CREATE TABLE IF NOT EXISTS mailbox_state (
    account TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    dry_run INTEGER NOT NULL DEFAULT 0,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL,
    PRIMARY KEY (account, mailbox, dry_run)
);
CREATE TABLE IF NOT EXISTS corrections (
    key TEXT NOT NULL,
    actual TEXT NOT NULL,
    account TEXT NOT NULL,
    predicted TEXT NOT NULL,
    was_unsure INTEGER NOT NULL,
    corrected_at REAL NOT NULL,
    PRIMARY KEY (key, actual)
);
CREATE TABLE IF NOT EXISTS envelopes (
    key TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    sender TEXT NOT NULL,
    sent TEXT NOT NULL
);
"""

# Decisions of the SMTP content filter and of the milter live in the same table under these
# account names, so `stats` and the correction scan cover every intake. Each message gets the
# next uid of its intake.
SMTP_INTAKE = "smtp"
SMTP_MAILBOX = "(relayed)"
MILTER_INTAKE = "milter"
MILTER_MAILBOX = "(milter)"
_INTAKE_MAILBOX = {SMTP_INTAKE: SMTP_MAILBOX, MILTER_INTAKE: MILTER_MAILBOX}



class Status(StrEnum):
    """``messages.status``: where a message stands in its lifecycle."""

    PENDING = "pending"  # claimed, the action may be under way (a crash leaves it for recovery)
    DONE = "done"        # decided and in its one place
    FAILED = "failed"    # refused or undecidable; in the source, retried at ``retry_at`` if set
    SKIPPED = "skipped"  # the same message was already decided under another UID


class Claim(StrEnum):
    """What ``StateDB.claim`` answers."""

    CLAIMED = "claimed"      # the caller acts, then sets the status
    TAKEN = "taken"          # this UID already has a row: another worker has it, or it is handled
    DUPLICATE = "duplicate"  # the same message is done or pending elsewhere: recorded skipped


STATUSES = tuple(Status)
# Where a decided message is: filed / unsure / quarantined (in that folder), dry_run (untouched), failed
# and quarantine_pending (refused; still in the watched mailbox, retried after a backoff).
OUTCOMES = ("filed", "unsure", "dry_run", "failed", "quarantined", "quarantine_pending")


@dataclass(frozen=True)
class MessageRow:
    """One row of ``messages``: what is known about a message the watcher saw."""

    account: str
    mailbox: str
    uidvalidity: int
    uid: int
    key: str
    fingerprint: str | None
    label: str | None
    confidence: float | None
    unsure: bool
    folder: str | None
    action: str
    model_version: str | None
    dry_run: bool
    status: Status
    dest_uidvalidity: int | None
    dest_uidnext: int | None
    error: str | None
    decided_at: float
    content: str | None = None
    attempts: int = 0
    retry_at: float | None = None
    quarantined: bool = False
    explanation: str | None = None  # JSON (Explanation.from_json reads it); None before schema 5


@dataclass(frozen=True)
class FiledRow:
    """A message the daemon really filed or tagged: input of the correction scan."""

    key: str
    label: str
    unsure: bool
    folder: str
    account: str
    decided_at: float
    model_version: str | None


def state_path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be the state database, judged from what is on disk now, or None.

    ``StateDB`` and ``mailtriage check`` both ask this, so `check` fails exactly where `serve` would.
    """
    p = Path(path)
    if p.is_dir():
        return (f"state_path {str(p)!r} is a directory; state_path names the database file inside it, "
                f"e.g. {str(p / 'state.sqlite3')!r}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"state_path {str(p)!r} lies under {str(parent)!r}, which is a file, not a directory"
            break
    return None


def _private_file(path: Path) -> None:
    """Create the state directory 0700 and the database 0600 (SQLite gives its -wal and -shm
    files the database's mode). Existing ones keep their modes: the admin chose those."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    except OSError:
        return  # sqlite3.connect reports an unusable path with the fix in its message
    os.chmod(path, 0o600)


def _check_schema(conn: sqlite3.Connection, path: str, *, create: bool) -> None:
    """Refuse a database of another schema version (PRAGMA user_version) with a clear message;
    a new, empty database gets the schema when ``create``."""
    # One statement, one snapshot: another process may create the schema between two reads.
    version, tables = conn.execute(
        "SELECT user_version, (SELECT count(*) FROM sqlite_master WHERE type = 'table') FROM pragma_user_version"
    ).fetchone()
    if version == SCHEMA_VERSION:
        if create:
            conn.executescript(_SCHEMA)  # IF NOT EXISTS: a no-op on a complete database
        return
    if create and version in _MIGRATIONS:
        _migrate(conn, version)
        return
    if not create and 0 < version < SCHEMA_VERSION and version in _MIGRATIONS:
        return  # read as it is (stats reads no column a migration adds); the daemon migrates it
    if version == 0 and tables == 0:
        if not create:
            raise StateError(
                f"the state database {path!r} is empty (no mailtriage tables yet); it is created by "
                "`mailtriage serve`, or remove the empty file"
            )
        _create(conn)
        _check_schema(conn, path, create=True)  # as created here, or by a process that won the race
        return
    if version == 0:
        raise StateError(
            f"{path!r} has tables but no mailtriage schema version (PRAGMA user_version = 0): it is not a "
            "mailtriage state database. Point state_path at the right file (or a new one)"
        )
    if version > SCHEMA_VERSION:
        raise StateError(
            f"the state database {path!r} has schema version {version}, written by a newer mailtriage; this "
            f"one knows version {SCHEMA_VERSION}. Upgrade mailtriage (or restore a backup of the database)"
        )
    raise StateError(
        f"the state database {path!r} has schema version {version}; this mailtriage needs {SCHEMA_VERSION} "
        "and has no migration from it. Move the file away to start afresh (decisions are forgotten)"
    )


def _wal(conn: sqlite3.Connection, wait: float = 30.0) -> None:
    """Switch to WAL. On a new file another process may be switching at the same moment, and
    SQLite answers that with "database is locked" at once, without its busy timeout: retry."""
    deadline = time.monotonic() + wait
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _create(conn: sqlite3.Connection) -> None:
    """Give an empty database the schema in one transaction. Two processes starting at once on a
    new file (two `serve` by mistake, a CLI beside the daemon) would otherwise see each other's
    half-made schema — tables without a version — and one would refuse the file as foreign."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        empty = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        if empty and conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            # execute(), not executescript(): executescript commits first, outside this transaction
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have done it
        while current in _MIGRATIONS:
            for statement in _MIGRATIONS[current]:
                conn.execute(statement)
            current += 1
            conn.execute(f"PRAGMA user_version={current}")
        conn.execute("COMMIT")
        conn.executescript(_SCHEMA)  # IF NOT EXISTS: indexes a migration needs
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class StateDB:
    """The state database. ``readonly=True`` (``mailtriage stats``) never writes a byte: no schema,
    no pragma that writes, no file created; it works on a read-only file or directory."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = str(path)
        self.readonly = readonly and self.path != ":memory:"
        problem = state_path_problem(self.path) if self.path != ":memory:" else None
        if problem:
            raise StateError(f"{problem}; fix state_path in the config")
        if self.path != ":memory:" and not self.readonly:
            _private_file(Path(self.path))
        self._local = threading.local()
        self._conn()  # create (or check) the schema now, so a bad path fails at start-up, not mid-mail

    # ---- connection per thread ---------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._open_readonly() if self.readonly else self._open_writable()
                _check_schema(conn, self.path, create=not self.readonly)
            except sqlite3.Error as exc:
                what = "read" if self.readonly else "write to"
                raise StateError(
                    f"cannot open the state database {self.path!r}: {exc}. Check state_path in the config "
                    f"and that this user may {what} the file and its directory"
                ) from exc
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def _open_writable(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        _wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _open_readonly(self) -> sqlite3.Connection:
        # With a -wal file (the daemon is running, or stopped uncleanly) mode=ro reads through it.
        # Without one the database file holds everything, and immutable=1 reads it without
        # creating -wal/-shm files (mode=ro would try to, and fails in a read-only directory).
        uri = Path(self.path).absolute().as_uri()
        wal = Path(self.path + "-wal").exists()
        conn = sqlite3.connect(f"{uri}?{'mode=ro' if wal else 'immutable=1'}", uri=True, timeout=30,
                               isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn
    def close(self) -> None:
        """Close this thread's connection (other threads close theirs when they end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _exec(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self._conn().execute(sql, tuple(params))

    # ---- one worker per mailbox -------------------------------------------------------------

    def lock_mailbox(self, account: str, mailbox: str) -> Callable[[], None] | None:
        """Take the exclusive lock of (account, mailbox) beside the database; returns its release,
        or None while another worker (thread or process) holds it. An flock: the kernel drops it
        when its process dies, SIGKILL included, so the next worker recovers what it left."""
        if self.path == ":memory:":
            return lambda: None  # a private database: nobody else can share it
        directory = Path(self.path + ".locks")
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            name = hashlib.sha256(f"{account}\0{mailbox}".encode()).hexdigest()[:32] + ".lock"
            fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(
                f"cannot create the mailbox lock in {str(directory)!r}: {exc}. The state directory must be "
                "writable by the daemon's user"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {account} {mailbox}\n".encode())
        return lambda: os.close(fd)

    # ---- per-message progress ----------------------------------------------------------------

    def is_done(
        self, account: str, key: str, content: str | None = None, *, dry_run: bool = False, origin: str | None = None
    ) -> bool:
        """Was this message (by key and content fingerprint) already decided in this account?

        ``content`` None matches any row of the key; a row without one (schema version 1) matches
        any content. A real decision counts for both modes; a dry-run decision only for dry runs, so
        turning dry_run off files what the dry run merely looked at.
        """
        row = self._exec(
            "SELECT 1 FROM messages WHERE (account=? OR origin=?) AND key=? AND status='done' AND (dry_run=0 OR ?=1) "
            "AND (? IS NULL OR content IS NULL OR content=?) LIMIT 1",
            (account, origin, key, int(dry_run), content, content),
        ).fetchone()
        return row is not None

    def handled_uids(
        self, account: str, mailbox: str, uidvalidity: int, uids: Iterable[int], *, dry_run: bool = False,
        origin: str | None = None,
    ) -> set[int]:
        """The subset of ``uids`` already done, failed or skipped under this UIDVALIDITY (by this
        account, or by any account of the same ``origin``)."""
        wanted = list(uids)
        found: set[int] = set()
        for start in range(0, len(wanted), 500):  # stay under SQLite's bound-parameter limit
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._exec(
                f"SELECT uid FROM messages WHERE (account=? OR origin=?) AND mailbox=? AND uidvalidity=? "
                f"AND status IN ('done','failed','skipped') AND (dry_run=0 OR ?=1) AND uid IN ({marks})",
                (account, origin, mailbox, uidvalidity, int(dry_run), *chunk),
            ).fetchall()
            found.update(r["uid"] for r in rows)
        return found

    def claim(
        self,
        account: str,
        mailbox: str,
        uidvalidity: int,
        uid: int,
        key: str,
        decision: Decision,
        action: str,
        model_version: str | None,
        *,
        content: str | None = None,
        folder: str | None = None,
        fingerprint: str | None = None,
        dest_uidvalidity: int | None = None,
        dest_uidnext: int | None = None,
        origin: str | None = None,
        explanation: Explanation | None = None,
    ) -> Claim:
        """Take one message for acting, atomically: record it 'pending' unless someone has it.

        Returns 'claimed' (the caller acts, then sets the status), 'taken' (this UID already has a
        row: another worker is acting on it or it is handled) or 'duplicate' (the same message, key
        and content, is done or pending under another UID or mailbox of the account: recorded
        'skipped'). One IMMEDIATE transaction, so of two workers (threads or processes sharing the
        database) exactly one gets 'claimed'. With ``origin``, rows of every account reaching the same
        login count too: the mailbox is the server's, not the account name's.
        """
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            where = (account, mailbox, uidvalidity, uid)
            taken = conn.execute(
                "SELECT dry_run FROM messages WHERE mailbox=? AND uidvalidity=? AND uid=? AND (account=? OR origin=?) "
                "ORDER BY dry_run LIMIT 1",
                (mailbox, uidvalidity, uid, account, origin),
            ).fetchone()
            if taken is not None and not taken["dry_run"]:
                conn.execute("COMMIT")
                return Claim.TAKEN
            if taken is not None:  # a dry run only looked at it: now it is filed for real
                conn.execute("DELETE FROM messages WHERE account=? AND mailbox=? AND uidvalidity=? AND uid=?", where)
            same = conn.execute(
                "SELECT 1 FROM messages WHERE (account=? OR origin=?) AND key=? AND status IN ('done','pending') "
                "AND dry_run=0 AND (content IS NULL OR ? IS NULL OR content=?) LIMIT 1",
                (account, origin, key, content, content),
            ).fetchone()
            if same is not None:
                conn.execute(
                    """INSERT INTO messages (account, mailbox, uidvalidity, uid, key, content, action, status, error,
                        origin, decided_at, updated_at) VALUES (?,?,?,?,?,?,'none','skipped','already decided',?,?,?)""",
                    (account, mailbox, uidvalidity, uid, key, content, origin, now, now),
                )
                conn.execute("COMMIT")
                return Claim.DUPLICATE
            conn.execute(
                """INSERT INTO messages (account, mailbox, uidvalidity, uid, key, content, fingerprint, label,
                    confidence, unsure, folder, action, model_version, dry_run, status, dest_uidvalidity,
                    dest_uidnext, origin, explanation, decided_at, updated_at)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,0,'pending',?,?,?,?,?,?)""",
                (account, mailbox, uidvalidity, uid, key, content, fingerprint, decision.label, decision.confidence,
                 int(decision.unsure), folder if folder is not None else decision.folder, action, model_version,
                 dest_uidvalidity, dest_uidnext, origin, _json(explanation), now, now),
            )
            conn.execute("COMMIT")
            return Claim.CLAIMED
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def record_decision(
        self,
        account: str,
        mailbox: str,
        uidvalidity: int,
        uid: int,
        key: str,
        decision: Decision,
        action: str,
        model_version: str | None,
        dry_run: bool,
        status: str,
        *,
        content: str | None = None,
        folder: str | None = None,
        fingerprint: str | None = None,
        dest_uidvalidity: int | None = None,
        dest_uidnext: int | None = None,
        error: str | None = None,
        explanation: Explanation | None = None,
    ) -> None:
        """Insert or update the row of one message (dry runs, failures; a real action ``claim``s first)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        now = time.time()
        self._exec(
            """
            INSERT INTO messages (account, mailbox, uidvalidity, uid, key, content, fingerprint, label, confidence,
                unsure, folder, action, model_version, dry_run, status, dest_uidvalidity, dest_uidnext,
                error, explanation, decided_at, updated_at)
            VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
            ON CONFLICT (account, mailbox, uidvalidity, uid) DO UPDATE SET
                key=excluded.key, content=COALESCE(excluded.content, content),
                fingerprint=COALESCE(excluded.fingerprint, fingerprint),
                label=excluded.label, confidence=excluded.confidence, unsure=excluded.unsure,
                folder=excluded.folder, action=excluded.action, model_version=excluded.model_version,
                dry_run=excluded.dry_run, status=excluded.status,
                dest_uidvalidity=COALESCE(excluded.dest_uidvalidity, dest_uidvalidity),
                dest_uidnext=COALESCE(excluded.dest_uidnext, dest_uidnext),
                error=excluded.error, explanation=COALESCE(excluded.explanation, explanation),
                updated_at=excluded.updated_at
            """,
            (
                account, mailbox, uidvalidity, uid, key, content, fingerprint, decision.label, decision.confidence,
                int(decision.unsure), folder if folder is not None else decision.folder, action, model_version,
                int(dry_run), status, dest_uidvalidity, dest_uidnext, error, _json(explanation), now, now,
            ),
        )

    def record_relayed(
        self, key: str, decision: Decision, model_version: str | None, *, intake: str = SMTP_INTAKE,
        explanation: Explanation | None = None, envelope: Envelope | None = None,
    ) -> None:
        """One message the SMTP content filter tagged and the next hop accepted, or the milter
        (``intake=MILTER_INTAKE``) tagged (action 'header'; ``folder`` is where its category header
        sends it). One statement: atomic next uid."""
        mailbox = _INTAKE_MAILBOX[intake]
        now = time.time()
        self._exec(
            """INSERT INTO messages (account, mailbox, uidvalidity, uid, key, label, confidence, unsure, folder,
                   action, model_version, dry_run, status, explanation, decided_at, updated_at)
               SELECT ?, ?, 0, COALESCE(MAX(uid), 0) + 1, ?, ?, ?, ?, ?, 'header', ?, 0, 'done', ?, ?, ?
               FROM messages WHERE account = ? AND mailbox = ?""",
            (intake, mailbox, key, decision.label, decision.confidence, int(decision.unsure),
             decision.folder, model_version, _json(explanation), now, now, intake, mailbox),
        )
        if envelope is not None:
            self.record_envelope(key, envelope)

    def set_status(
        self, account: str, mailbox: str, uidvalidity: int, uid: int, status: str, error: str | None = None
    ) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        self._exec(
            "UPDATE messages SET status=?, error=?, updated_at=? WHERE account=? AND mailbox=? AND uidvalidity=? AND uid=?",
            (status, error, time.time(), account, mailbox, uidvalidity, uid),
        )

    def record_skip(
        self, account: str, mailbox: str, uidvalidity: int, uid: int, key: str, reason: str, content: str | None = None,
        *, origin: str | None = None,
    ) -> None:
        """Remember a UID whose message was already decided under another UID (never overwrites)."""
        now = time.time()
        self._exec(
            """INSERT OR IGNORE INTO messages (account, mailbox, uidvalidity, uid, key, content, action, status, error,
                origin, decided_at, updated_at) VALUES (?,?,?,?,?,?,'none','skipped',?,?,?,?)""",
            (account, mailbox, uidvalidity, uid, key, content, reason, origin, now, now),
        )

    def record_failure(
        self, account: str, mailbox: str, uidvalidity: int, uid: int, key: str, error: str, *, origin: str | None = None
    ) -> None:
        """Remember a message that could not be decided (a poison message: classify kept failing on
        it): status 'failed', nothing done to it, so the rest of the mailbox keeps flowing."""
        now = time.time()
        self._exec(
            """INSERT OR IGNORE INTO messages (account, mailbox, uidvalidity, uid, key, action, status, error,
                origin, decided_at, updated_at) VALUES (?,?,?,?,?,'none','failed',?,?,?,?)""",
            (account, mailbox, uidvalidity, uid, key, error, origin, now, now),
        )

    # ---- retries of refused actions, then quarantine ----------------------------------------

    def fail_attempt(
        self, account: str, mailbox: str, uidvalidity: int, uid: int, error: str, retry_at: float | None
    ) -> int:
        """One more failed attempt at this message's action: status 'failed', the next try at
        ``retry_at`` (None: never). Returns how many attempts have failed."""
        self._exec(
            "UPDATE messages SET status='failed', error=?, attempts=attempts+1, retry_at=?, updated_at=? "
            "WHERE account=? AND mailbox=? AND uidvalidity=? AND uid=?",
            (error, retry_at, time.time(), account, mailbox, uidvalidity, uid),
        )
        row = self._exec(
            "SELECT attempts FROM messages WHERE account=? AND mailbox=? AND uidvalidity=? AND uid=?",
            (account, mailbox, uidvalidity, uid),
        ).fetchone()
        return int(row["attempts"]) if row else 0

    def due_retries(self, account: str, mailbox: str, uidvalidity: int, now: float | None = None) -> list[MessageRow]:
        """Failed rows of this mailbox whose next attempt is due."""
        rows = self._exec(
            "SELECT * FROM messages WHERE account=? AND mailbox=? AND uidvalidity=? AND status='failed' "
            "AND retry_at IS NOT NULL AND retry_at <= ? AND dry_run=0 ORDER BY retry_at, uid",
            (account, mailbox, uidvalidity, time.time() if now is None else now),
        ).fetchall()
        return [_message_row(r) for r in rows]

    def next_retry_at(self, account: str, mailbox: str) -> float | None:
        row = self._exec(
            "SELECT MIN(retry_at) AS t FROM messages WHERE account=? AND mailbox=? AND status='failed' "
            "AND retry_at IS NOT NULL AND dry_run=0",
            (account, mailbox),
        ).fetchone()
        return None if row is None or row["t"] is None else float(row["t"])

    def take_retry(self, account: str, mailbox: str, uidvalidity: int, uid: int) -> bool:
        """Claim a due retry (failed -> pending) in one statement: only one worker gets it."""
        cur = self._exec(
            "UPDATE messages SET status='pending', retry_at=NULL, updated_at=? WHERE account=? AND mailbox=? "
            "AND uidvalidity=? AND uid=? AND status='failed' AND retry_at IS NOT NULL",
            (time.time(), account, mailbox, uidvalidity, uid),
        )
        return cur.rowcount == 1

    def set_quarantine(
        self, account: str, mailbox: str, uidvalidity: int, uid: int, folder: str,
        dest_uidvalidity: int | None, dest_uidnext: int | None,
    ) -> None:
        """Retries ran out: the (pending) row now moves the message to ``folder``."""
        self._exec(
            "UPDATE messages SET folder=?, action='move', quarantined=1, dest_uidvalidity=?, dest_uidnext=?, "
            "updated_at=? WHERE account=? AND mailbox=? AND uidvalidity=? AND uid=?",
            (folder, dest_uidvalidity, dest_uidnext, time.time(), account, mailbox, uidvalidity, uid),
        )

    def pending(self, account: str, mailbox: str) -> list[MessageRow]:
        """Rows recorded 'pending' and never finished: a crash happened while acting on them."""
        rows = self._exec(
            "SELECT * FROM messages WHERE account=? AND mailbox=? AND status='pending' ORDER BY uid",
            (account, mailbox),
        ).fetchall()
        return [_message_row(r) for r in rows]

    def adopt(self, account: str, mailbox: str, origin: str) -> int:
        """Rows of this mailbox that another account name of the same ``origin`` left unfinished
        (pending, or failed and due a retry) become this account's, so its recovery and retries
        finish them. Call it holding the mailbox's lock: no other worker has them then."""
        cur = self._exec(
            "UPDATE OR IGNORE messages SET account=?, updated_at=? WHERE origin=? AND mailbox=? AND account!=? "
            "AND (status='pending' OR (status='failed' AND retry_at IS NOT NULL))",
            (account, time.time(), origin, mailbox, account),
        )
        return cur.rowcount

    def get(self, account: str, mailbox: str, uidvalidity: int, uid: int) -> MessageRow | None:
        row = self._exec(
            "SELECT * FROM messages WHERE account=? AND mailbox=? AND uidvalidity=? AND uid=?",
            (account, mailbox, uidvalidity, uid),
        ).fetchone()
        return _message_row(row) if row else None

    def rows(self, account: str | None = None) -> list[MessageRow]:
        """Every message row (tests and debugging)."""
        if account is None:
            rows = self._exec("SELECT * FROM messages ORDER BY decided_at, uid").fetchall()
        else:
            rows = self._exec("SELECT * FROM messages WHERE account=? ORDER BY decided_at, uid", (account,)).fetchall()
        return [_message_row(r) for r in rows]

    # ---- mailbox cursor ----------------------------------------------------------------------

    def last_uid(self, account: str, mailbox: str, uidvalidity: int, *, dry_run: bool = False) -> int:
        """Highest UID fully handled under ``uidvalidity``; 0 when unknown or the UIDVALIDITY changed."""
        row = self._exec(
            "SELECT uidvalidity, last_uid FROM mailbox_state WHERE account=? AND mailbox=? AND dry_run=?",
            (account, mailbox, int(dry_run)),
        ).fetchone()
        if row is None or row["uidvalidity"] != uidvalidity:
            return 0
        return int(row["last_uid"])

    def stored_uidvalidity(self, account: str, mailbox: str, *, dry_run: bool = False) -> int | None:
        row = self._exec(
            "SELECT uidvalidity FROM mailbox_state WHERE account=? AND mailbox=? AND dry_run=?",
            (account, mailbox, int(dry_run)),
        ).fetchone()
        return None if row is None else int(row["uidvalidity"])

    def set_last_uid(self, account: str, mailbox: str, uidvalidity: int, uid: int, *, dry_run: bool = False) -> None:
        """Advance the cursor (never backwards under the same UIDVALIDITY; a new one resets it)."""
        self._exec(
            """INSERT INTO mailbox_state (account, mailbox, dry_run, uidvalidity, last_uid) VALUES (?,?,?,?,?)
               ON CONFLICT (account, mailbox, dry_run) DO UPDATE SET
                 last_uid = CASE WHEN uidvalidity = excluded.uidvalidity
                                 THEN MAX(last_uid, excluded.last_uid) ELSE excluded.last_uid END,
                 uidvalidity = excluded.uidvalidity""",
            (account, mailbox, int(dry_run), uidvalidity, uid),
        )

    # ---- feedback ----------------------------------------------------------------------------

    def filed(self, account: str | None = None) -> list[FiledRow]:
        """Messages the daemon really moved or tagged (not dry runs), the latest decision per key.

        ``account``: that account's decisions; the correction scan also asks for ``SMTP_INTAKE``'s and
        ``MILTER_INTAKE``'s."""
        sql = """
            SELECT key, label, unsure, folder, account, MAX(decided_at) AS decided_at, model_version
            FROM messages WHERE status='done' AND dry_run=0 AND action != 'none' {where}
            GROUP BY account, key ORDER BY decided_at
        """
        if account is None:
            rows = self._exec(sql.format(where="")).fetchall()
        else:
            rows = self._exec(sql.format(where="AND account=?"), (account,)).fetchall()
        return [
            FiledRow(r["key"], r["label"], bool(r["unsure"]), r["folder"], r["account"], r["decided_at"], r["model_version"])
            for r in rows
        ]

    def record_correction(self, key: str, account: str, predicted: str, actual: str, was_unsure: bool) -> bool:
        """Remember that staff moved ``key`` from ``predicted`` to ``actual``; True if it is new."""
        cur = self._exec(
            "INSERT OR IGNORE INTO corrections (key, actual, account, predicted, was_unsure, corrected_at) VALUES (?,?,?,?,?,?)",
            (key, actual, account, predicted, int(was_unsure), time.time()),
        )
        return cur.rowcount == 1

    def record_envelope(self, key: str, envelope: Envelope) -> None:
        """Remember the subject, sender and date of ``key`` for the web console (the latest wins)."""
        self._exec(
            "INSERT OR REPLACE INTO envelopes (key, subject, sender, sent) VALUES (?,?,?,?)",
            (key, envelope.subject, envelope.sender, envelope.date),
        )

    def has_table(self, name: str) -> bool:
        """Whether the database has table ``name`` (a read-only open of an older file may lack one)."""
        return self._exec("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Rows of one read-only SELECT (the web console's reports); writes go through the methods above."""
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            raise ValueError("StateDB.query runs SELECT statements only")
        return self._exec(sql, params).fetchall()

    def corrections(self) -> list[dict[str, Any]]:
        rows = self._exec("SELECT * FROM corrections ORDER BY corrected_at").fetchall()
        return [dict(r) for r in rows]

    # ---- reporting ---------------------------------------------------------------------------

    def stats(self, window_days: int = 30, *, now: float | None = None) -> dict[str, Any]:
        """Decisions, corrections and live accuracy over the last ``window_days`` (``mailtriage stats``).

        Outcomes (OUTCOMES): filed (acted on with a category), unsure (below threshold), dry_run, failed,
        quarantined (in the quarantine folder), quarantine_pending (refused there; still in the source).
        Live accuracy of a category = 1 - corrections of messages filed as it / messages filed as it.
        """
        since = (time.time() if now is None else now) - window_days * 86400
        decisions: dict[str, dict[str, int]] = {}
        totals = dict.fromkeys(OUTCOMES, 0)
        columns = {r["name"] for r in self._exec("PRAGMA table_info(messages)").fetchall()}
        old = "quarantined" not in columns  # read-only on an older schema
        quarantined = "0" if old else "quarantined"
        retry_expr = "0" if old else "retry_at IS NOT NULL"
        rows = self._exec(
            f"""SELECT label, status, dry_run, unsure, {quarantined} AS quarantined, {retry_expr} AS retrying,
                   COUNT(*) AS n FROM messages
               WHERE status IN ('done','failed') AND decided_at >= ?
               GROUP BY label, status, dry_run, unsure, quarantined, retrying""",
            (since,),
        ).fetchall()
        retrying = 0  # failed but due another attempt: still in the watched mailbox
        for r in rows:
            if r["quarantined"] and r["status"] == Status.DONE:
                outcome = "quarantined"
            elif r["quarantined"] and r["retrying"]:
                outcome = "quarantine_pending"  # the quarantine folder refused it: still in the source
            elif r["status"] == Status.FAILED:
                retrying += r["n"] if r["retrying"] else 0
                outcome = "failed"
            elif r["dry_run"]:
                outcome = "dry_run"
            elif r["unsure"]:
                outcome = "unsure"
            else:
                outcome = "filed"
            per = decisions.setdefault(r["label"], dict.fromkeys(OUTCOMES, 0))
            per[outcome] += r["n"]
            totals[outcome] += r["n"]
        intakes = {"imap": 0, "smtp": 0, "milter": 0}
        for r in self._exec(
            "SELECT CASE account WHEN ? THEN 'smtp' WHEN ? THEN 'milter' ELSE 'imap' END AS intake, COUNT(*) AS n "
            "FROM messages WHERE status IN ('done','failed') AND decided_at >= ? GROUP BY intake",
            (SMTP_INTAKE, MILTER_INTAKE, since),
        ).fetchall():
            intakes[r["intake"]] += r["n"]
        corr_rows = self._exec(
            "SELECT predicted, actual, was_unsure, COUNT(*) AS n FROM corrections WHERE corrected_at >= ? "
            "GROUP BY predicted, actual, was_unsure",
            (since,),
        ).fetchall()
        pairs = [{"predicted": r["predicted"], "actual": r["actual"], "was_unsure": bool(r["was_unsure"]), "n": r["n"]} for r in corr_rows]
        wrong_by_label: dict[str, int] = {}
        for p in pairs:
            if not p["was_unsure"]:
                wrong_by_label[p["predicted"]] = wrong_by_label.get(p["predicted"], 0) + p["n"]
        accuracy: dict[str, dict[str, Any]] = {}
        for label, per in sorted(decisions.items(), key=lambda kv: str(kv[0])):
            filed_n = per["filed"]
            wrong = min(wrong_by_label.get(label, 0), filed_n)
            accuracy[label] = {
                "filed": filed_n,
                "corrected": wrong,
                "accuracy": (1 - wrong / filed_n) if filed_n else None,
            }
        filed_total = totals["filed"]
        wrong_total = min(sum(wrong_by_label.values()), filed_total)
        return {
            "window_days": window_days,
            "since": since,
            "decisions": decisions,
            "totals": {**totals, "all": sum(totals.values())},
            # Decided messages not yet in their place: in the watched mailbox, tried again after a backoff.
            "in_source": {"retrying": retrying, "quarantine_pending": totals["quarantine_pending"]},
            "intakes": intakes,
            "corrections": {
                "total": sum(p["n"] for p in pairs),
                "from_unsure": sum(p["n"] for p in pairs if p["was_unsure"]),
                "pairs": pairs,
            },
            "accuracy": accuracy,
            "overall_accuracy": (1 - wrong_total / filed_total) if filed_total else None,
        }


def _message_row(r: sqlite3.Row) -> MessageRow:
    return MessageRow(
        account=r["account"],
        mailbox=r["mailbox"],
        uidvalidity=r["uidvalidity"],
        uid=r["uid"],
        key=r["key"],
        fingerprint=r["fingerprint"],
        label=r["label"],
        confidence=r["confidence"],
        unsure=bool(r["unsure"]),
        folder=r["folder"],
        action=r["action"],
        model_version=r["model_version"],
        dry_run=bool(r["dry_run"]),
        status=Status(r["status"]),
        dest_uidvalidity=r["dest_uidvalidity"],
        dest_uidnext=r["dest_uidnext"],
        error=r["error"],
        decided_at=r["decided_at"],
        content=r["content"] if "content" in r.keys() else None,
        attempts=r["attempts"] if "attempts" in r.keys() else 0,
        retry_at=r["retry_at"] if "retry_at" in r.keys() else None,
        quarantined=bool(r["quarantined"]) if "quarantined" in r.keys() else False,
        explanation=r["explanation"] if "explanation" in r.keys() else None,
    )


def _json(explanation: Explanation | None) -> str | None:
    return None if explanation is None else explanation.to_json()

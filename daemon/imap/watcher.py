"""One watched (account, mailbox): the connection, the mailbox's lock, catching up, then IDLE (or
poll), reconnecting with backoff. What happens to each message is imap/filing.py's.

Runs in its own thread; its IMAPClient is created and used only there. Inference is the service's
``classify`` callable, which serialises all watchers on one model worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
from imapclient import IMAPClient

from mailtriage.config import AccountConfig, Config, mailbox_id
from mailtriage.core import backoff
from mailtriage.core.pipeline import ClassifyFn
from mailtriage.errors import InferenceUnavailable, MailboxError
from mailtriage.imap import actions, connection, preflight
from mailtriage.imap.filing import CLASSIFY_FETCH_BYTES, Filing, Link
from mailtriage.store.state import StateDB

log = structlog.get_logger(__name__)

ConnectFn = Callable[[AccountConfig], IMAPClient]

IDLE_SLICE_S = 1.0  # idle_check timeout: how quickly a stop request is noticed

__all__ = ["CLASSIFY_FETCH_BYTES", "ClassifyFn", "ConnectFn", "MailboxWatcher"]


class MailboxWatcher:
    """Files new mail of one mailbox. ``run(stop)`` is the worker loop; the other public methods
    are its steps, usable on their own (tests, ``mailtriage check``)."""

    def __init__(
        self,
        account: AccountConfig,
        mailbox: str,
        config: Config,
        state: StateDB,
        classify: ClassifyFn,
        *,
        connect: ConnectFn | None = None,
        idle_slice: float = IDLE_SLICE_S,
        backoff_start: float = 1.0,
    ) -> None:
        self.account = account
        self.mailbox = mailbox
        self.config = config
        self.state = state
        self.classify = classify
        self._connect_fn = connect or connection.connect
        self.idle_slice = idle_slice
        self.backoff_start = backoff_start
        self.client: IMAPClient | None = None
        self.uidvalidity: int | None = None
        self.dry_run = account.dry_run
        self.action = account.action
        self._stop = threading.Event()
        self._has_move = self._has_uidplus = self._has_idle = False
        self._release_lock: Callable[[], None] | None = None  # held while this worker files the mailbox
        self.filing = Filing(account, mailbox, config, state, classify, stopping=lambda: self._stop.is_set())
        self.log = log.bind(account=account.name, mailbox=mailbox)

    # ---- connection ------------------------------------------------------------------------

    def connect(self, *, work: bool = True) -> IMAPClient:
        """Connect, check what our action needs, select the mailbox and finish crashed work.

        ``work`` (not for a dry run): take the mailbox's lock in the state DB first — one worker
        files a mailbox at a time, so recovery never meets another live worker's 'pending' rows —
        and recover. ``work=False`` only connects and checks (``mailtriage check``)."""
        self.close()
        if work and not self.dry_run:
            self._take_lock()
        client = self._connect_fn(self.account)
        self.client = client
        try:
            self._has_move = client.has_capability("MOVE")
            self._has_uidplus = client.has_capability("UIDPLUS")
            self._has_idle = client.has_capability("IDLE")
            self._preflight(client)
            self.select()
            if work and not self.dry_run:
                self.recover_pending()
        except BaseException:
            self.close()
            raise
        return client

    def close(self) -> None:
        client, self.client = self.client, None
        self.filing.link = None
        connection.close(client)
        release, self._release_lock = self._release_lock, None
        if release is not None:
            release()

    def _take_lock(self) -> None:
        # Keyed by the login the account reaches, not its name: a renamed account, or another
        # spelling of the same server, is the same mailbox and must wait its turn too.
        release = self.state.lock_mailbox(self.filing.origin, mailbox_id(self.mailbox))
        if release is None:
            raise MailboxError(
                f"another mailtriage worker is filing {self.account.name}/{self.mailbox} (login "
                f"{self.filing.origin!r}; it holds the lock in {self.state.path}.locks); this one retries after a "
                "backoff. Two `mailtriage serve` on one state database and mailbox, or two accounts reaching "
                "one login: stop one"
            )
        self._release_lock = release

    def check(self) -> None:
        """Connect and verify capabilities and folders (``mailtriage check``); raises MailboxError."""
        try:
            self.connect(work=False)
        finally:
            self.close()

    def _preflight(self, client: IMAPClient) -> None:
        """The same rules `mailtriage check` prints (imap/preflight.py); a FAIL stops this watcher."""
        problems = [f for f in preflight.for_serve(client, self.account, self.config) if f.status == preflight.FAIL]
        if problems and self.dry_run:  # a dry run touches nothing, so it can still show what it would do
            for p in problems:
                self.log.warning("preflight_problem_dry_run", problem=p.line())
            return
        preflight.raise_failures(problems)

    def _client(self) -> IMAPClient:
        if self.client is None:
            self.connect()
        assert self.client is not None
        return self.client

    def select(self) -> int:
        """Select the watched mailbox (read-only in a dry run) and note a UIDVALIDITY change."""
        client = self._client()
        info = actions.select_source(client, self.mailbox, None, readonly=self.dry_run)
        uidvalidity = int(info[b"UIDVALIDITY"])
        stored = self.state.stored_uidvalidity(self.account.name, self.mailbox, dry_run=self.dry_run)
        if stored is not None and stored != uidvalidity:
            # UIDs were renumbered: start the cursor again; message keys keep us from refiling.
            self.log.warning("uidvalidity_changed", old=stored, new=uidvalidity)
        if self.action == "keyword" and not self.dry_run:
            preflight.raise_failures([preflight.keyword_finding(info, self.account, self.mailbox)])
        self.uidvalidity = uidvalidity
        self.filing.link = Link(client, uidvalidity, self._has_move, self._has_uidplus)
        return uidvalidity

    # ---- the work (imap/filing.py) ---------------------------------------------------------

    def recover_pending(self) -> int:
        """Finish or settle actions a crash interrupted; each ends in exactly one place."""
        self._client()
        count = self.filing.recover_pending()
        if count:
            self.select()  # recovery examined other folders: the watched one is selected again
        return count

    def process_backlog(self) -> int:
        """Decide and act on every message above the cursor, in batches; returns how many were decided.

        Repeats while the server announced new mail during the pass (``connection.took_new_mail``),
        so nothing that arrived mid-pass waits for the IDLE that follows, which would not report it.
        """
        count = self._backlog_pass()
        # Ends when a pass ran into no new mail: a pass that acted re-selects (announcing EXISTS),
        # so it costs one more SEARCH that finds nothing; only mail that keeps arriving keeps it going.
        while not self._stop.is_set() and connection.took_new_mail(self._client()):
            count += self._backlog_pass()
        return count

    def _backlog_pass(self) -> int:
        client = self._client()
        self.select()
        connection.took_new_mail(client)  # what the SELECT itself said is already known
        return self.filing.backlog_pass()

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Worker-thread loop until ``stop`` is set: connect, recover, catch up, then IDLE or poll;
        on any error log it, close, and reconnect after an exponential backoff (<= reconnect_max)."""
        self._stop = stop
        attempt = 0
        try:
            while not stop.is_set():
                try:
                    self.connect()
                    self.process_backlog()
                    attempt = 0
                    if self._has_idle:
                        self._idle_loop(stop)
                    else:
                        self._poll_loop(stop)
                except connection.CONNECTION_ERRORS as exc:
                    self.log.warning("imap_connection_lost", error=str(exc), error_type=type(exc).__name__)
                except MailboxError as exc:
                    self.log.error("imap_error", error=str(exc))
                except InferenceUnavailable as exc:  # the mail waits in the mailbox; nothing is at fault
                    self.log.warning("inference_unavailable", error=str(exc))
                except Exception as exc:  # noqa: BLE001 - e.g. the model failed: retry later, never die
                    self.log.error("watcher_error", error=str(exc), error_type=type(exc).__name__, exc_info=True)
                self.close()
                if stop.is_set():
                    break
                delay = backoff.delay(attempt, self.backoff_start, float(self.account.reconnect_max))
                attempt += 1
                self.log.info("imap_reconnect_scheduled", delay_s=delay, attempt=attempt)
                stop.wait(delay)
        finally:
            self.close()
            self.log.info("watcher_stopped")

    def _idle_loop(self, stop: threading.Event) -> None:
        client = self._client()
        while not stop.is_set():
            client.idle()
            started = time.monotonic()
            new_mail = False
            quick_empty = 0
            # Re-issued before idle_timeout: RFC 2177 servers may drop an IDLE after 29 minutes;
            # ended early when a refused action's retry is due.
            limit = float(self.account.idle_timeout)
            due = None if self.dry_run else self.state.next_retry_at(self.account.name, self.mailbox)
            if due is not None:
                limit = min(limit, max(self.idle_slice, due - time.time()))
            try:
                while not stop.is_set() and time.monotonic() - started < limit:
                    t0 = time.monotonic()
                    responses = client.idle_check(timeout=self.idle_slice)
                    for resp in responses:
                        if resp and resp[0] == b"BYE":
                            raise ConnectionAbortedError(f"server said BYE during IDLE: {resp!r}")
                        if len(resp) >= 2 and resp[1] in (b"EXISTS", b"RECENT"):
                            new_mail = True
                    if new_mail:
                        break
                    # idle_check swallows EOF: a readable socket that yields nothing, again and
                    # again, is a closed connection.
                    if not responses and time.monotonic() - t0 < self.idle_slice / 2:
                        quick_empty += 1
                        if quick_empty >= 3:
                            raise ConnectionAbortedError("server closed the connection during IDLE")
                    else:
                        quick_empty = 0
            except BaseException:
                connection.close(client)
                self.client = None
                self.filing.link = None
                raise
            client.idle_done()
            if stop.is_set():
                return
            self.process_backlog()

    def _poll_loop(self, stop: threading.Event) -> None:
        client = self._client()
        self.log.info("imap_polling", interval_s=self.account.poll_interval, reason="server lacks IDLE")
        while not stop.wait(self.account.poll_interval):
            client.noop()
            self.process_backlog()

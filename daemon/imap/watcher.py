"""One watched (account, mailbox): catch up, then IDLE (or poll), and file every new message
exactly once — state is written before acting, so a crash at any point is finished on restart.

Runs in its own thread; its IMAPClient is created and used only there. Inference is the service's
``classify`` callable, which serialises all watchers on one model worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from imapclient import IMAPClient

from mailtriage.imap import actions
from mailtriage.core import tagging

from mailtriage.imap import connection, preflight, recovery

from mailtriage import metrics
from mailtriage.core.classifier import Prediction
from mailtriage.config import AccountConfig, Config, mailbox_id
from mailtriage.errors import MailboxError, ModelError
from mailtriage.core import mailtext
from mailtriage.core.mailtext import content_fingerprint, mail_text, message_key
from mailtriage.core.routing import Decision, decide
from mailtriage.store.state import MessageRow, StateDB


log = structlog.get_logger(__name__)

ClassifyFn = Callable[[Sequence[str]], tuple[list[Prediction], str]]
ConnectFn = Callable[[AccountConfig], IMAPClient]

# Exactly the prefix mail_text reads of any message (its one rule), so a partial fetch gives the same
# text as the whole message; the header action still fetches the whole message, to copy it byte for byte.
CLASSIFY_FETCH_BYTES = mailtext.MAX_INPUT_BYTES
CANARY_TEXT = "mailtriage: a plain test message about an invoice"  # tells a broken model from poison
IDLE_SLICE_S = 1.0  # idle_check timeout: how quickly a stop request is noticed
RETRY_MAX_S = 3600.0  # longest wait between two attempts at a refused action
_FLAGS, _DATE = b"FLAGS", b"INTERNALDATE"


@dataclass
class _Fetched:
    uid: int
    raw: bytes
    flags: tuple[bytes, ...]
    internaldate: datetime | None
    key: str
    fetched_at: float
    content: str = ""  # mailtext.content_fingerprint: with key, "the same message"


def byte_groups(uids: Sequence[int], sizes: Mapping[int, int], cap: int, budget: int) -> list[list[int]]:
    """Split ``uids`` (in order) into FETCH groups whose messages, each counted up to ``cap``
    bytes, add up to at most ``budget``; a group holds at least one message."""
    groups: list[list[int]] = []
    used = budget + 1
    for uid in uids:
        cost = min(sizes.get(uid, cap), cap)
        if groups and used + cost <= budget:
            groups[-1].append(uid)
            used += cost
        else:
            groups.append([uid])
            used = cost
    return groups


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
        connection.close(client)
        release, self._release_lock = self._release_lock, None
        if release is not None:
            release()

    def _take_lock(self) -> None:
        release = self.state.lock_mailbox(self.account.name, mailbox_id(self.mailbox))
        if release is None:
            raise MailboxError(
                f"another mailtriage worker is filing {self.account.name}/{self.mailbox} (it holds the lock in "
                f"{self.state.path}.locks); this one retries after a backoff. Two `mailtriage serve` on one "
                "state database and mailbox: stop one"
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
        return uidvalidity

    # ---- crash recovery (imap/recovery.py) ----------------------------------------------------

    def recover_pending(self) -> int:
        """Finish or settle actions a crash interrupted; each ends in exactly one place."""
        return recovery.recover_pending(self)

    def _locate(self, row: MessageRow) -> tuple[bool, int | None]:
        return recovery.locate(self, row)

    # ---- the work ----------------------------------------------------------------------------

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
        uidvalidity = self.select()
        connection.took_new_mail(client)  # what the SELECT itself said is already known
        if not self.dry_run:
            self._retry_due(uidvalidity)
        last = self.state.last_uid(self.account.name, self.mailbox, uidvalidity, dry_run=self.dry_run)
        found = sorted(u for u in client.search(["UID", f"{last + 1}:*", "UNDELETED"]) if u > last)
        handled = self.state.handled_uids(self.account.name, self.mailbox, uidvalidity, found, dry_run=self.dry_run)
        todo = [u for u in found if u not in handled]
        self._queue_depth(len(todo))
        if todo:
            self.log.info("backlog", messages=len(todo), last_uid=last)
        count = 0
        batch_size = self.account.fetch_batch
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            count += self._process_batch(batch, uidvalidity)
            self.state.set_last_uid(self.account.name, self.mailbox, uidvalidity, batch[-1], dry_run=self.dry_run)
            self._queue_depth(len(todo) - start - len(batch))
            if self._stop.is_set():
                break
        if found and not todo:
            self.state.set_last_uid(self.account.name, self.mailbox, uidvalidity, found[-1], dry_run=self.dry_run)
        return count

    def _fetch(self, uids: list[int]) -> list[_Fetched]:
        client = self._client()
        cap = self.account.max_message_bytes
        if self.action == "header" and not self.dry_run:
            body_item, body_key = "BODY.PEEK[]", b"BODY[]"
        else:
            cap = min(cap, CLASSIFY_FETCH_BYTES)
            body_item, body_key = f"BODY.PEEK[]<0.{cap}>", b"BODY[]<0>"
        started = time.monotonic()
        sizes = {uid: int(d.get(b"RFC822.SIZE", 0)) for uid, d in client.fetch(uids, ["RFC822.SIZE"]).items()}
        out = []
        # A batch of big messages is fetched a few at a time: at most max_message_bytes per FETCH.
        for group in byte_groups([u for u in uids if u in sizes], sizes, cap, self.account.max_message_bytes):
            data = client.fetch(group, [body_item, "FLAGS", "INTERNALDATE"])
            for uid in group:
                d = data.get(uid)
                if d is None:  # expunged between SEARCH and FETCH: nothing to do
                    continue
                raw = d.get(body_key)
                if raw is None:
                    raw = d.get(b"BODY[]", b"")
                out.append(_Fetched(uid, raw, tuple(d.get(_FLAGS, ())), d.get(_DATE), message_key(raw), started,
                                    content_fingerprint(raw)))
        return out

    def _process_batch(self, uids: list[int], uidvalidity: int) -> int:
        fetched = self._fetch(uids)
        fresh: list[_Fetched] = []
        keys: set[tuple[str, str]] = set()
        for item in fetched:
            # Same message (Message-ID and content) under another UID: a re-delivery, or renumbered by
            # a UIDVALIDITY change. Another message reusing the Message-ID has other content: filed.
            same = (item.key, item.content)
            if same in keys or self.state.is_done(self.account.name, item.key, item.content, dry_run=self.dry_run):
                self.state.record_skip(self.account.name, self.mailbox, uidvalidity, item.uid, item.key,
                                       "already decided", item.content)
                self.log.info("message_skipped_already_decided", uid=item.uid, message_id=item.key)
                continue
            keys.add(same)
            fresh.append(item)
        if not fresh:
            return 0
        texts = [mail_text(item.raw) for item in fresh]  # never raises, bounded time
        try:
            predictions, model_version = self._classify(texts)
            decided = list(zip(fresh, predictions))
        except Exception as exc:  # noqa: BLE001 - one poison message must not stall the mailbox
            decided, model_version = self._classify_one_by_one(fresh, texts, uidvalidity, exc)
        for item, pred in decided:
            if pred.label not in self.config.categories:
                raise ModelError(
                    f"the model predicted {pred.label!r}, which is not a configured category "
                    f"{list(self.config.categories)}; the adapter does not match [categories]"
                )
            decision = decide(pred, self.config.model.threshold, self.config.categories, self.config.unsure_folder)
            self._decide_and_act(item, decision, model_version, uidvalidity)
        return len(decided)

    def _classify(self, texts: list[str]) -> tuple[list[Prediction], str]:
        predictions, model_version = self.classify(texts)
        if len(predictions) != len(texts):
            raise ModelError(f"classify returned {len(predictions)} predictions for {len(texts)} texts")
        return predictions, model_version

    def _classify_one_by_one(
        self, fresh: list[_Fetched], texts: list[str], uidvalidity: int, batch_error: Exception
    ) -> tuple[list[tuple[_Fetched, Prediction]], str]:
        """The batch failed: classify each message alone. One that still fails is a poison message:
        recorded 'failed' and moved to the quarantine folder, so the others are filed. When every one fails, a
        canary text tells a broken model (raise: the watcher backs off and retries) from poison."""
        self.log.warning("classify_batch_failed", error=str(batch_error), messages=len(fresh))
        decided: list[tuple[_Fetched, Prediction]] = []
        poison: list[tuple[_Fetched, Exception]] = []
        version = ""
        for item, text in zip(fresh, texts):
            try:
                (pred,), version = self._classify([text])
            except Exception as exc:  # noqa: BLE001
                poison.append((item, exc))
            else:
                decided.append((item, pred))
        if poison and not decided:
            self._classify([CANARY_TEXT])  # raises when the model itself is broken
        for item, exc in poison:
            error = f"classify failed on this message: {type(exc).__name__}: {exc}"
            self.state.record_failure(self.account.name, self.mailbox, uidvalidity, item.uid, item.key, error)
            metrics.MESSAGES.labels(category="", outcome="failed").inc()
            self.log.error("message_poison", uid=item.uid, message_id=item.key, error=error,
                           outcome="failed", folder=self.mailbox)
            row = self.state.get(self.account.name, self.mailbox, uidvalidity, item.uid)
            if not self.dry_run and row is not None and row.status == "failed" and not row.quarantined:
                # Never asked of the model again, so never stranded in the watched mailbox either:
                # staff see it in the quarantine folder (default: the unsure folder).
                self._quarantine(row)
        return decided, version

    def _placed_folder(self, decision: Decision) -> str:
        return self.mailbox if self.action == "keyword" else decision.folder

    def _decide_and_act(self, item: _Fetched, decision: Decision, model_version: str, uidvalidity: int) -> None:
        acct, mbox = self.account.name, self.mailbox
        placed = self._placed_folder(decision)
        if self.dry_run:
            self.state.record_decision(
                acct, mbox, uidvalidity, item.uid, item.key, decision, self.action, model_version, True, "done",
                folder=placed, content=item.content,
            )
            return self._done(item, decision, "dry_run", placed)
        client = self._client()
        fingerprint = tagging.header_fingerprint(item.raw)
        dest_validity = dest_next = None
        status_error = None
        try:
            if self.action in ("move", "header"):
                dest_validity, dest_next = actions.folder_uidnext(client, decision.folder)
        except MailboxError as exc:
            status_error = str(exc)
        # Claimed ('pending') before acting, in one transaction: after a crash recover_pending finds
        # the message and finishes; of two workers on one message only one gets it.
        claim = self.state.claim(
            acct, mbox, uidvalidity, item.uid, item.key, decision, self.action, model_version, content=item.content,
            folder=placed, fingerprint=fingerprint, dest_uidvalidity=dest_validity, dest_uidnext=dest_next,
        )
        if claim != "claimed":
            event = "message_skipped_already_decided" if claim == "duplicate" else "message_claimed_elsewhere"
            self.log.info(event, uid=item.uid, message_id=item.key)
            return
        if status_error is not None:
            self.failed_attempt(item.uid, uidvalidity, status_error)
            return self._done(item, decision, "failed", placed, error=status_error)
        try:
            self._act(self.action, item.uid, decision, item, uidvalidity, dest_next)
        except MailboxError as exc:
            status = self._status_after_failure(item.uid, uidvalidity)
            if status == "failed":  # safely in the source only: try again later
                self.failed_attempt(item.uid, uidvalidity, str(exc))
            else:
                self.state.set_status(acct, mbox, uidvalidity, item.uid, status, str(exc))
            return self._done(item, decision, "failed", placed, error=str(exc), status=status)
        self.state.set_status(acct, mbox, uidvalidity, item.uid, "done")
        self._done(item, decision, "unsure" if decision.unsure else "filed", placed)

    def _act(
        self, action: str, uid: int, decision: Decision, item: _Fetched | None, uidvalidity: int,
        dest_next: int | None = None,
    ) -> None:
        client = self._client()
        if action == "move":
            actions.move(client, uid, decision.folder, self._has_move, self._has_uidplus)
        elif action == "keyword":
            actions.set_keyword(client, uid, decision, self.account.keyword_prefix)
        else:
            assert item is not None, "the header action needs the fetched message"
            actions.rewrite_header(
                client, uid, item.raw, item.flags, item.internaldate, decision, self.mailbox,
                source_uidvalidity=uidvalidity, has_uidplus=self._has_uidplus, dest_uidnext=dest_next,
                max_bytes=self.account.max_message_bytes,
            )

    # ---- retries of refused actions (issue 8 item 2) ------------------------------------------

    def failed_attempt(self, uid: int, uidvalidity: int, error: str) -> None:
        """One more refused attempt at this message's action: it stays 'failed' in the source and is
        tried again after a backoff (retry_backoff, doubling, <= RETRY_MAX_S); once retry_attempts
        have failed, the next pass moves it to the quarantine folder. A refused quarantine is final."""
        acct, mbox = self.account.name, self.mailbox
        row = self.state.get(acct, mbox, uidvalidity, uid)
        attempts = (row.attempts if row else 0) + 1
        if row is not None and row.quarantined:
            self.state.fail_attempt(acct, mbox, uidvalidity, uid, error, None)
            self.log.error("quarantine_failed", uid=uid, message_id=row.key, folder=row.folder, error=error,
                           fix="the message stays in the watched mailbox; check the quarantine folder and the server")
            return
        wait = 0.0 if attempts >= self.config.retry_attempts else min(
            RETRY_MAX_S, self.config.retry_backoff * 2 ** (attempts - 1)
        )
        self.state.fail_attempt(acct, mbox, uidvalidity, uid, error, time.time() + wait)
        self.log.warning("action_retry_scheduled", uid=uid, attempts=attempts, retry_in_s=round(wait, 1),
                         then="quarantine" if attempts >= self.config.retry_attempts else "retry", error=error)

    def _retry_due(self, uidvalidity: int) -> None:
        acct, mbox = self.account.name, self.mailbox
        for row in self.state.due_retries(acct, mbox, uidvalidity):
            if self._stop.is_set():
                return
            if not self.state.take_retry(acct, mbox, uidvalidity, row.uid):
                continue  # another worker took it
            if row.attempts >= self.config.retry_attempts:
                self._quarantine(row)
                continue
            status = recovery.recover(self, row)  # locate, then finish or redo the action
            metrics.RETRIES.labels(result=status).inc()

    def _quarantine(self, row: MessageRow) -> None:
        acct, mbox = self.account.name, self.mailbox
        folder = self.config.quarantine()
        try:
            dest_validity, dest_next = actions.folder_uidnext(self._client(), folder)
        except MailboxError as exc:
            self.state.set_quarantine(acct, mbox, row.uidvalidity, row.uid, folder, None, None)
            metrics.RETRIES.labels(result="failed").inc()
            return self.failed_attempt(row.uid, row.uidvalidity, f"quarantine into {folder!r}: {exc}")
        self.state.set_quarantine(acct, mbox, row.uidvalidity, row.uid, folder, dest_validity, dest_next)
        moved = self.state.get(acct, mbox, row.uidvalidity, row.uid)
        assert moved is not None
        status = recovery.recover(self, moved)
        metrics.RETRIES.labels(result="quarantined" if status == "done" else status).inc()
        if status == "done":
            metrics.MESSAGES.labels(category=row.label or "", outcome="quarantined").inc()
            self.log.warning("message_quarantined", uid=row.uid, message_id=row.key, folder=folder,
                             attempts=row.attempts, error=row.error, outcome="quarantined")

    def _status_after_failure(self, uid: int, uidvalidity: int) -> str:
        """After a refused action: 'failed' when the message is safely in the source only; still
        'pending' when a copy may exist too (the next connect finishes the removal)."""
        client = self._client()
        actions.select_source(client, self.mailbox, uidvalidity)
        row = self.state.get(self.account.name, self.mailbox, uidvalidity, uid)
        if row is None or row.action == "keyword":
            return "failed"
        try:
            in_source, copy = self._locate(row)
        except MailboxError:
            return "pending"  # cannot tell where it is: the next connect looks again
        if copy is not None and in_source:
            return "pending"
        return "done" if copy is not None else "failed"

    def _done(self, item: _Fetched, decision: Decision, outcome: str, folder: str, **extra: Any) -> None:
        latency = time.monotonic() - item.fetched_at
        metrics.MESSAGES.labels(category=decision.label, outcome=outcome).inc()
        if outcome != "failed":
            metrics.LATENCY.observe(latency)
        event = "message_failed" if outcome == "failed" else "message_decided"
        (self.log.error if outcome == "failed" else self.log.info)(
            event,
            message_id=item.key,
            uid=item.uid,
            label=decision.label,
            confidence=round(decision.confidence, 4),
            unsure=decision.unsure,
            action="none" if self.dry_run else self.action,
            outcome=outcome,
            folder=folder,
            dry_run=self.dry_run,
            latency_ms=round(latency * 1000, 1),
            **extra,
        )

    def _queue_depth(self, n: int) -> None:
        metrics.QUEUE_DEPTH.labels(account=self.account.name, mailbox=self.mailbox).set(n)

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
                except Exception as exc:  # noqa: BLE001 - e.g. the model failed: retry later, never die
                    self.log.error("watcher_error", error=str(exc), error_type=type(exc).__name__, exc_info=True)
                self.close()
                if stop.is_set():
                    break
                delay = min(float(self.account.reconnect_max), self.backoff_start * 2**attempt)
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

"""Filing one mailbox's messages, each exactly once: the per-message lifecycle in one place.

    fetch -> dedupe -> classify (poison isolation) -> route -> claim -> act -> done | retry | quarantine

and crash recovery of what a previous run left 'pending'. State is written before acting (the
claim), so a crash at any point is finished on restart: each pending row is looked up where it can
be — still in the source mailbox (same UIDVALIDITY) and/or as a copy in its destination (by header
fingerprint, above the destination's UIDNEXT recorded before acting) — and ends in exactly one
place: the copy kept and the original removed, the action redone, or the row marked failed when
the message left both.

A backlog goes in batches, each one FETCH, overlapped with the model: the next batch is fetched
while this one is classified, and handed to the model before this one's actions. The connection
stays on the watcher's thread; only the wait for the model runs on a helper thread.

The watcher (imap/watcher.py) owns the connection, the lock and IDLE; it hands this module a
``Link`` to the selected mailbox and calls ``recover_pending`` and ``backlog_pass``.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import structlog
from imapclient import IMAPClient

from mailtriage.config import AccountConfig, Config
from mailtriage.core import backoff, explain, identity, mailtext, pipeline, tagging
from mailtriage.core.envelope import envelope_of
from mailtriage.core.mailtext import content_fingerprint, mail_text, message_key
from mailtriage.core.pipeline import ClassifyFn, Routed
from mailtriage.core.routing import Decision
from mailtriage.errors import InferenceUnavailable, LabelMismatchError, MailboxError
from mailtriage.imap import actions
from mailtriage import metrics
from mailtriage.store.state import Claim, MessageRow, StateDB, Status

log = structlog.get_logger(__name__)

# Exactly the prefix mail_text reads of any message (its one rule), so a partial fetch gives the same
# text as the whole message; the header action still fetches the whole message, to copy it byte for byte.
CLASSIFY_FETCH_BYTES = mailtext.MAX_INPUT_BYTES
CANARY_TEXT = "mailtriage: a plain test message about an invoice"  # tells a broken model from poison
RETRY_MAX_S = 3600.0  # longest wait between two attempts at a refused action
_FLAGS, _DATE = b"FLAGS", b"INTERNALDATE"
T = TypeVar("T")


@dataclass
class Fetched:
    """One message as fetched for filing."""

    uid: int
    raw: bytes
    flags: tuple[bytes, ...]
    internaldate: datetime | None
    key: str
    fetched_at: float
    content: str = ""  # mailtext.content_fingerprint: with key, "the same message"


@dataclass
class Link:
    """The watcher's connection with the watched mailbox selected: what filing acts through."""

    client: IMAPClient
    uidvalidity: int
    has_move: bool
    has_uidplus: bool


def _same(a: BaseException, b: BaseException) -> bool:
    return type(a) is type(b) and str(a) == str(b)


def _body(d: Mapping[bytes, Any], key: bytes) -> bytes:
    raw = d.get(key)
    return d.get(b"BODY[]", b"") if raw is None else raw


def _fetched(uid: int, raw: bytes, d: Mapping[bytes, Any], started: float) -> Fetched:
    return Fetched(uid, raw, tuple(d.get(_FLAGS, ())), d.get(_DATE), message_key(raw), started,
                   content_fingerprint(raw))


def _in_background(fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """``fn(*args)`` on a daemon thread of its own: a classify call stuck in the model never keeps
    the process from exiting (the service abandons its inference worker the same way)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting watcher, as a direct call would raise it
            future.set_exception(exc)

    threading.Thread(target=run, name="classify-wait", daemon=True).start()
    return future


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


@dataclass
class _Batch:
    """One batch ready for the model: the fresh messages, their texts, and the classify call, run
    here when asked for its result or started ahead on a helper thread."""

    uids: list[int]
    uidvalidity: int
    fresh: list[Fetched]
    texts: list[str]
    classify: Callable[[], list[Routed]]
    early: bool = False  # deduped before the previous batch was filed
    future: concurrent.futures.Future[list[Routed]] | None = None

    def start(self) -> _Batch:
        if self.future is None and self.fresh:
            self.future = _in_background(self.classify)
        return self

    def result(self) -> list[Routed]:
        return self.classify() if self.future is None else self.future.result()


class DestinationMarks:
    """Each destination's (UIDVALIDITY, UIDNEXT) as it was before a batch's first action there: one
    STATUS per folder and batch, not per message.

    A claim records the mark so crash recovery looks for the copy only from there on (by header
    fingerprint). A mark taken before earlier moves of the same batch is lower than the folder's
    UIDNEXT at this message's action, so the copy is still above it; the search just also meets
    those earlier copies. Should one of them carry the same header block (same fingerprint, other
    content), recovery could take it for this message's copy: such a message gets a fresh STATUS,
    taken after that copy arrived. A refused STATUS is remembered for the batch too: every message
    of that folder waits for its retry, as it would after its own refused STATUS."""

    def __init__(self) -> None:
        self._marks: dict[str, tuple[int, int] | MailboxError] = {}
        self._placed: set[tuple[str, str]] = set()

    def before(self, client: IMAPClient, folder: str, fingerprint: str) -> tuple[int, int]:
        mark = self._marks.get(folder)
        if mark is None or (folder, fingerprint) in self._placed:
            try:
                mark = actions.folder_uidnext(client, folder)
            except MailboxError as exc:
                mark = exc
            self._marks[folder] = mark
        self._placed.add((folder, fingerprint))
        if isinstance(mark, MailboxError):
            raise mark
        return mark


class Filing:
    """Files the messages of one (account, mailbox) through the ``link`` the watcher sets."""

    def __init__(
        self,
        account: AccountConfig,
        mailbox: str,
        config: Config,
        state: StateDB,
        classify: ClassifyFn,
        *,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.account = account
        self.mailbox = mailbox
        self.config = config
        self.state = state
        self.classify = classify
        self.stopping = stopping
        self.rules = pipeline.Rules.of(config)
        self.dry_run = account.dry_run
        self.action = account.action
        self.link: Link | None = None
        self._ahead: _Batch | None = None  # the next batch of a backlog, already with the model
        # The login the account reaches, whatever it is called: claims and dedupe count every
        # account name with this origin, so a second spelling of the server never refiles a message.
        self.origin = identity.login_id(account.username, account.host)
        self.log = log.bind(account=account.name, mailbox=mailbox)

    def _link(self) -> Link:
        if self.link is None:
            raise MailboxError(f"{self.account.name}/{self.mailbox}: not connected (filing needs the watcher's link)")
        return self.link

    # ---- a backlog pass ----------------------------------------------------------------------

    def backlog_pass(self) -> int:
        """Retry what is due, then decide and act on every message above the cursor, in batches;
        returns how many were decided. The mailbox must be selected (``link.uidvalidity``)."""
        link = self._link()
        uidvalidity = link.uidvalidity
        if not self.dry_run:
            self._retry_due(uidvalidity)
        last = self.state.last_uid(self.account.name, self.mailbox, uidvalidity, dry_run=self.dry_run)
        found = sorted(u for u in link.client.search(["UID", f"{last + 1}:*", "UNDELETED"]) if u > last)
        handled = self.state.handled_uids(self.account.name, self.mailbox, uidvalidity, found, dry_run=self.dry_run,
                                          origin=self.origin)
        todo = [u for u in found if u not in handled]
        self._queue_depth(len(todo))
        if todo:
            self.log.info("backlog", messages=len(todo), last_uid=last)
        count = 0
        batch_size = self.account.fetch_batch
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        self._ahead = None
        for n, batch in enumerate(batches):
            following = batches[n + 1] if n + 1 < len(batches) else None
            count += self.process_batch(batch, uidvalidity, following=following)
            self.state.set_last_uid(self.account.name, self.mailbox, uidvalidity, batch[-1], dry_run=self.dry_run)
            self._queue_depth(len(todo) - n * batch_size - len(batch))
            if self.stopping():
                break
        self._ahead = None
        if found and not todo:
            self.state.set_last_uid(self.account.name, self.mailbox, uidvalidity, found[-1], dry_run=self.dry_run)
        return count

    def fetch(self, uids: list[int]) -> list[Fetched]:
        """The messages of ``uids`` (those still there), in order, holding at most max_message_bytes
        of message text at a time.

        One FETCH for the batch asks each message's size with its first ``share`` bytes (the byte
        budget split evenly): every message that fits its share, nearly all mail, arrives whole in
        that one round trip. Only a larger one (an attachment) is fetched again, up to ``cap``, a few
        at a time (``byte_groups``)."""
        client = self._link().client
        cap = budget = self.account.max_message_bytes
        if self.action == "header" and not self.dry_run:
            whole_item, whole_key = "BODY.PEEK[]", b"BODY[]"
        else:
            cap = min(cap, CLASSIFY_FETCH_BYTES)
            whole_item, whole_key = f"BODY.PEEK[]<0.{cap}>", b"BODY[]<0>"
        share = max(1, min(cap, budget // max(1, len(uids))))
        started = time.monotonic()
        got: dict[int, Fetched] = {}
        sizes: dict[int, int] = {}
        data = client.fetch(uids, ["RFC822.SIZE", f"BODY.PEEK[]<0.{share}>", "FLAGS", "INTERNALDATE"])
        for uid in uids:
            d = data.pop(uid, None)
            if d is None:  # expunged between SEARCH and FETCH: nothing to do
                continue
            raw = _body(d, b"BODY[]<0>")
            size = int(d.get(b"RFC822.SIZE", 0))
            # Cut at its share (by the size the server gave, or by the bytes that came, should the two
            # disagree) and more was wanted: fetched again below.
            if share < cap and (size > share or len(raw) >= share):
                sizes[uid] = size
                continue
            got[uid] = _fetched(uid, raw, d, started)
        del data
        for group in byte_groups(list(sizes), sizes, cap, budget):
            data = client.fetch(group, [whole_item, "FLAGS", "INTERNALDATE"])
            for uid in group:
                d = data.pop(uid, None)
                if d is not None:
                    got[uid] = _fetched(uid, _body(d, whole_key), d, started)
            del data
        return [got[uid] for uid in uids if uid in got]

    def process_batch(self, uids: list[int], uidvalidity: int, *, following: list[int] | None = None) -> int:
        """Fetch, dedupe, classify and act on one batch of UIDs; returns how many were decided.

        ``following``, the next batch's UIDs (a backlog), keeps the model and the IMAP work
        overlapped: that batch is fetched and prepared while the model classifies this one, and
        handed to the model before this one's actions. Only this thread touches the connection
        (imapclient is not thread-safe); a helper thread just waits for the model."""
        work, self._ahead = self._ahead, None
        if work is None or work.uids != uids or work.uidvalidity != uidvalidity:
            work = self._prepare(self.fetch(uids), uids, uidvalidity)
        if following is not None:
            work.start()
        ahead = None
        if following is not None and not self.stopping():
            ahead = self._prepare(self.fetch(following), following, uidvalidity)
            ahead.early = True
        if not work.fresh:
            self._ahead = ahead.start() if ahead is not None else None
            return 0
        deferred: list[Fetched] = []
        try:
            decided = list(zip(work.fresh, work.result()))
        except (LabelMismatchError, InferenceUnavailable):
            # The adapter does not fit the config, or the server is down or overloaded: no message is
            # at fault, so none is isolated; the batch waits (the cursor stays) and the watcher backs off.
            raise
        except Exception as exc:  # noqa: BLE001 - one poison message must not stall the mailbox
            decided, deferred = self._classify_one_by_one(work.fresh, work.texts, uidvalidity, exc)
        if ahead is not None:
            self._ahead = ahead.start()  # the model works on the next batch while this one is filed
        if work.early:
            # Deduped before the previous batch was filed: a message that batch decided meanwhile is
            # skipped here, as it would have been then (a claim would refuse it too; a dry run does not claim).
            still = {id(item) for item in self._dedupe([item for item, _ in decided], uidvalidity)}
            decided = [(item, routed) for item, routed in decided if id(item) in still]
        marks = DestinationMarks()
        for item, routed in decided:
            self._decide_and_act(item, routed, uidvalidity, marks)
        if deferred:
            # Raised after the others were filed, before the cursor passes the deferred ones: the
            # next pass fetches them again, with no attempt counted against them.
            raise InferenceUnavailable(
                f"classification failed while the model was not healthy; {len(deferred)} message(s) of "
                f"{self.account.name}/{self.mailbox} (uid {', '.join(str(i.uid) for i in deferred)}) wait for the "
                "next pass, they are not quarantined"
            )
        return len(decided)

    def _prepare(self, fetched: list[Fetched], uids: list[int], uidvalidity: int) -> _Batch:
        fresh = self._dedupe(fetched, uidvalidity)
        texts = [mail_text(item.raw) for item in fresh]  # never raises, bounded time
        return _Batch(uids, uidvalidity, fresh, texts,
                      lambda: pipeline.classify_and_route(texts, self.classify, self.rules))

    def _dedupe(self, fetched: list[Fetched], uidvalidity: int) -> list[Fetched]:
        fresh: list[Fetched] = []
        keys: set[tuple[str, str]] = set()
        for item in fetched:
            # Same message (Message-ID and content) under another UID: a re-delivery, or renumbered by
            # a UIDVALIDITY change. Another message reusing the Message-ID has other content: filed.
            same = (item.key, item.content)
            if same in keys or self.state.is_done(self.account.name, item.key, item.content, dry_run=self.dry_run,
                                                  origin=self.origin):
                self.state.record_skip(self.account.name, self.mailbox, uidvalidity, item.uid, item.key,
                                       "already decided", item.content, origin=self.origin)
                self.log.info("message_skipped_already_decided", uid=item.uid, message_id=item.key)
                continue
            keys.add(same)
            fresh.append(item)
        return fresh

    def _classify_one_by_one(
        self, fresh: list[Fetched], texts: list[str], uidvalidity: int, batch_error: Exception
    ) -> tuple[list[tuple[Fetched, Routed]], list[Fetched]]:
        """The batch failed: classify each message alone. Returns (decided, deferred).

        Only a message that fails while the model is healthy is poison: recorded 'failed' and moved
        to the quarantine folder, so the others are filed. A message is deferred instead (left for
        the next pass, no attempt counted) when its failure is the server's (InferenceUnavailable),
        or when the batch and every message alone failed the same way (the model, not the mail).
        When every one fails, a canary text tells a broken model (raise: the watcher backs off and
        retries) from poison."""
        self.log.warning("classify_batch_failed", error=str(batch_error), messages=len(fresh))
        decided: list[tuple[Fetched, Routed]] = []
        poison: list[tuple[Fetched, Exception]] = []
        deferred: list[Fetched] = []
        for item, text in zip(fresh, texts):
            try:
                (routed,) = pipeline.classify_and_route([text], self.classify, self.rules)
            except LabelMismatchError:
                raise
            except InferenceUnavailable as exc:
                deferred.append(item)
                self.log.warning("message_deferred", uid=item.uid, message_id=item.key, error=str(exc))
            except Exception as exc:  # noqa: BLE001
                poison.append((item, exc))
            else:
                decided.append((item, routed))
        if poison and not decided:
            self.classify([CANARY_TEXT])  # raises when the model itself is broken
        if len(poison) > 1 and not decided and not deferred and all(_same(exc, batch_error) for _, exc in poison):
            # Several different messages failing exactly like the batch did is the model's trouble,
            # even if the canary got through a moment later: retry them, quarantine none.
            self.log.warning("classify_failed_alike_deferred", messages=len(poison), error=str(batch_error))
            return decided, [item for item, _ in poison]
        for item, exc in poison:
            error = f"classify failed on this message: {type(exc).__name__}: {exc}"
            self.state.record_failure(self.account.name, self.mailbox, uidvalidity, item.uid, item.key, error,
                                      origin=self.origin)
            metrics.MESSAGES.labels(category="", outcome="failed").inc()
            self.log.error("message_poison", uid=item.uid, message_id=item.key, error=error,
                           outcome="failed", folder=self.mailbox)
            row = self.state.get(self.account.name, self.mailbox, uidvalidity, item.uid)
            if not self.dry_run and row is not None and row.status == Status.FAILED and not row.quarantined:
                # Never asked of the model again, so never stranded in the watched mailbox either:
                # staff see it in the quarantine folder (default: the unsure folder).
                self._quarantine(row)
        return decided, deferred

    # ---- claim and act -----------------------------------------------------------------------

    def _placed_folder(self, decision: Decision) -> str:
        return self.mailbox if self.action == "keyword" else decision.folder

    def _decide_and_act(self, item: Fetched, routed: Routed, uidvalidity: int,
                        marks: DestinationMarks | None = None) -> None:
        acct, mbox = self.account.name, self.mailbox
        decision, model_version = routed.decision, routed.model_version
        placed = self._placed_folder(decision)
        self._remember_envelope(item)
        if self.dry_run:
            self.state.record_decision(
                acct, mbox, uidvalidity, item.uid, item.key, decision, self.action, model_version, True, Status.DONE,
                folder=placed, content=item.content, explanation=routed.explanation,
            )
            return self._done(item, decision, "dry_run", placed)
        client = self._link().client
        fingerprint = tagging.header_fingerprint(item.raw)
        dest_validity = dest_next = None
        status_error = None
        try:
            if self.action in ("move", "header", "label"):
                marks = marks if marks is not None else DestinationMarks()
                dest_validity, dest_next = marks.before(client, decision.folder, fingerprint)
        except MailboxError as exc:
            status_error = str(exc)
        # Claimed ('pending') before acting, in one transaction: after a crash recover_pending finds
        # the message and finishes; of two workers on one message only one gets it.
        claim = self.state.claim(
            acct, mbox, uidvalidity, item.uid, item.key, decision, self.action, model_version, content=item.content,
            folder=placed, fingerprint=fingerprint, dest_uidvalidity=dest_validity, dest_uidnext=dest_next,
            origin=self.origin, explanation=routed.explanation,
        )
        if claim != Claim.CLAIMED:
            event = "message_skipped_already_decided" if claim == Claim.DUPLICATE else "message_claimed_elsewhere"
            self.log.info(event, uid=item.uid, message_id=item.key)
            return
        if status_error is not None:
            self.failed_attempt(item.uid, uidvalidity, status_error)
            return self._done(item, decision, "failed", placed, error=status_error)
        try:
            self.act(self.action, item.uid, decision, item, uidvalidity, dest_next, why=self._why(routed.explanation))
        except MailboxError as exc:
            status = self._status_after_failure(item.uid, uidvalidity)
            if status == Status.FAILED:  # safely in the source only: try again later
                self.failed_attempt(item.uid, uidvalidity, str(exc))
            else:
                self.state.set_status(acct, mbox, uidvalidity, item.uid, status, str(exc))
            return self._done(item, decision, "failed", placed, error=str(exc), status=status)
        self.state.set_status(acct, mbox, uidvalidity, item.uid, Status.DONE)
        self._done(item, decision, "unsure" if decision.unsure else "filed", placed)

    def _remember_envelope(self, item: Fetched) -> None:
        # The console finds a decision by subject and sender; losing that must never stop the filing.
        try:
            self.state.record_envelope(item.key, envelope_of(item.raw))
        except Exception as exc:  # noqa: BLE001
            self.log.warning("envelope_not_recorded", uid=item.uid, error=str(exc))

    def act(
        self, action: str, uid: int, decision: Decision, item: Fetched | None, uidvalidity: int,
        dest_next: int | None = None, *, why: str | None = None,
    ) -> None:
        """Do one claimed action on the server (a test or the kill-proof replaces this to crash here).
        ``why``: the X-Mailtriage-Why value the header action adds (None: none)."""
        link = self._link()
        if action == "move":
            actions.move(link.client, uid, decision.folder, link.has_move, link.has_uidplus)
        elif action == "keyword":
            actions.set_keyword(link.client, uid, decision, self.account.keyword_prefix)
        elif action == "label":
            # Label first, archive second: a crash between the two leaves the message labelled and
            # still in the source, and recovery's second STORE +X-GM-LABELS changes nothing.
            actions.set_label(link.client, uid, decision.folder)
            if self.account.label_archive:
                actions.archive(link.client, uid, self.mailbox)
        else:
            assert item is not None, "the header action needs the fetched message"
            actions.rewrite_header(
                link.client, uid, item.raw, item.flags, item.internaldate, decision, self.mailbox,
                source_uidvalidity=uidvalidity, has_uidplus=link.has_uidplus, dest_uidnext=dest_next,
                max_bytes=self.account.max_message_bytes, why=why,
            )

    def _why(self, explanation: explain.Explanation | str | None) -> str | None:
        """The X-Mailtriage-Why value when the config asks for it (``why_header``; only the header action
        writes it); a stored (JSON) explanation is read back, so a redone action carries it too."""
        if not self.config.why_header or not explanation:
            return None
        if isinstance(explanation, str):
            try:
                explanation = explain.Explanation.from_json(explanation)
            except ValueError:
                return None
        return explain.why_header(explanation)

    def _status_after_failure(self, uid: int, uidvalidity: int) -> Status:
        """After a refused action: 'failed' when the message is safely in the source only; still
        'pending' when a copy may exist too (the next connect finishes the removal)."""
        actions.select_source(self._link().client, self.mailbox, uidvalidity)
        row = self.state.get(self.account.name, self.mailbox, uidvalidity, uid)
        if row is None or row.action == "keyword" or (row.action == "label" and not self.account.label_archive):
            return Status.FAILED  # still in the source, tagged or not: the retry tags it (idempotent)
        try:
            in_source, copy = self.locate(row)
        except MailboxError:
            return Status.PENDING  # cannot tell where it is: the next connect looks again
        if copy is not None and in_source:
            return Status.PENDING
        return Status.DONE if copy is not None else Status.FAILED

    # ---- retries of refused actions, then quarantine -----------------------------------------

    def failed_attempt(self, uid: int, uidvalidity: int, error: str) -> None:
        """One more refused attempt at this message's action: it stays 'failed' in the source and is
        tried again after a backoff (retry_backoff, doubling, <= RETRY_MAX_S); once retry_attempts
        have failed, the next pass moves it to the quarantine folder. A refused quarantine is
        retried the same way, for as long as it takes: a message is never left in the watched
        mailbox for good."""
        acct, mbox = self.account.name, self.mailbox
        row = self.state.get(acct, mbox, uidvalidity, uid)
        attempts = (row.attempts if row else 0) + 1
        if row is not None and row.quarantined:
            # Counted from the first refused quarantine, so it starts again at retry_backoff.
            wait = backoff.delay(max(attempts - self.config.retry_attempts - 1, 0), self.config.retry_backoff,
                                 RETRY_MAX_S)
            self.state.fail_attempt(acct, mbox, uidvalidity, uid, error, time.time() + wait)
            self.log.error("quarantine_failed", uid=uid, message_id=row.key, folder=row.folder, error=error,
                           attempts=attempts, retry_in_s=round(wait, 1),
                           fix="the message stays in the watched mailbox until the quarantine folder accepts it; "
                           "check that folder and its rights on the server")
            return
        wait = 0.0 if attempts >= self.config.retry_attempts else backoff.delay(
            attempts - 1, self.config.retry_backoff, RETRY_MAX_S
        )
        self.state.fail_attempt(acct, mbox, uidvalidity, uid, error, time.time() + wait)
        self.log.warning("action_retry_scheduled", uid=uid, attempts=attempts, retry_in_s=round(wait, 1),
                         then="quarantine" if attempts >= self.config.retry_attempts else "retry", error=error)

    def _retry_due(self, uidvalidity: int) -> None:
        acct, mbox = self.account.name, self.mailbox
        for row in self.state.due_retries(acct, mbox, uidvalidity):
            if self.stopping():
                return
            if not self.state.take_retry(acct, mbox, uidvalidity, row.uid):
                continue  # another worker took it
            if row.quarantined or row.attempts >= self.config.retry_attempts:
                self._quarantine(row)
                continue
            status = self.recover(row)  # locate, then finish or redo the action
            metrics.RETRIES.labels(result=status).inc()

    def _quarantine(self, row: MessageRow) -> None:
        acct, mbox = self.account.name, self.mailbox
        folder = self.config.quarantine()
        try:
            dest_validity, dest_next = actions.folder_uidnext(self._link().client, folder)
        except MailboxError as exc:
            self.state.set_quarantine(acct, mbox, row.uidvalidity, row.uid, folder, None, None)
            metrics.RETRIES.labels(result="failed").inc()
            return self.failed_attempt(row.uid, row.uidvalidity, f"quarantine into {folder!r}: {exc}")
        self.state.set_quarantine(acct, mbox, row.uidvalidity, row.uid, folder, dest_validity, dest_next)
        moved = self.state.get(acct, mbox, row.uidvalidity, row.uid)
        assert moved is not None
        status = self.recover(moved)
        metrics.RETRIES.labels(result="quarantined" if status == Status.DONE else status).inc()
        if status == Status.DONE:
            metrics.MESSAGES.labels(category=row.label or "", outcome="quarantined").inc()
            self.log.warning("message_quarantined", uid=row.uid, message_id=row.key, folder=folder,
                             attempts=row.attempts, error=row.error, outcome="quarantined")

    # ---- crash recovery ----------------------------------------------------------------------

    def recover_pending(self) -> int:
        """Finish or settle every pending row of this mailbox; each message ends in one place.
        Returns how many rows there were (the caller re-selects the source after any).

        Rows another name of this account's login left unfinished (it was renamed) are taken over
        first; the caller holds the mailbox's lock, keyed by that login, so nobody else has them."""
        adopted = self.state.adopt(self.account.name, self.mailbox, self.origin)
        if adopted:
            self.log.warning("rows_adopted", rows=adopted, origin=self.origin,
                             why="another account name reached the same login and left these unfinished")
        rows = self.state.pending(self.account.name, self.mailbox)
        for row in rows:
            self.recover(row)
        return len(rows)

    def locate(self, row: MessageRow) -> tuple[bool, int | None]:
        """(is the UID still in the source mailbox, UID of its copy in the destination or None)."""
        link = self._link()
        client = link.client
        in_source = row.uidvalidity == link.uidvalidity and actions.uid_exists(client, row.uid)
        copy = None
        # A labelled message is looked for under its label too: it may have left the source since
        # (label_archive, or staff archived it), and then the label is all there is.
        if row.action in ("move", "header", "label") and row.folder and row.fingerprint:
            try:
                since = 1
                if row.dest_uidnext is not None:
                    dest_validity, _next = actions.folder_uidnext(client, row.folder)
                    since = row.dest_uidnext if dest_validity == row.dest_uidvalidity else 1
                copy = actions.find_copy(client, row.folder, row.fingerprint, since)
            except MailboxError as exc:
                # The destination cannot even be examined (e.g. it does not exist): no copy there.
                self.log.warning("destination_unreadable", folder=row.folder, uid=row.uid, error=str(exc))
            actions.select_source(client, self.mailbox, link.uidvalidity)
        return in_source, copy

    def recover(self, row: MessageRow) -> Status:
        """Settle one pending row; returns its status now (done, failed or still pending)."""
        link = self._link()
        bound = self.log.bind(uid=row.uid, message_id=row.key, action=row.action, folder=row.folder)
        decision = Decision(row.label or "", row.confidence or 0.0, row.unsure, row.folder or self.mailbox)
        in_source, copy = False, None
        try:
            in_source, copy = self.locate(row)
            if row.action == "keyword":
                if in_source:
                    actions.set_keyword(link.client, row.uid, decision, self.account.keyword_prefix)
                    return self._settle(row, Status.DONE, bound, "recovered_keyword_set")
                return self._settle(row, Status.FAILED, bound, "recovered_vanished",
                                    "message left the mailbox before it was tagged")
            if row.action == "label":
                if in_source:
                    # Labelled or not, archived or not: adding a label it has and removing one it
                    # lacks both change nothing, so redoing the whole action files it exactly once.
                    self.act("label", row.uid, decision, None, row.uidvalidity)
                    return self._settle(row, Status.DONE, bound, "recovered_label_set")
                if copy is not None:  # labelled, then archived: only the state was not written
                    return self._settle(row, Status.DONE, bound, "recovered_already_filed", copy_uid=copy)
                return self._settle(row, Status.FAILED, bound, "recovered_vanished",
                                    "message left the mailbox before it was labelled")
            if copy is not None and in_source:
                # The copy exists (COPY or APPEND done) but the original was not removed yet.
                actions.delete_original(link.client, row.uid, link.has_uidplus)
                return self._settle(row, Status.DONE, bound, "recovered_original_removed", copy_uid=copy)
            if copy is not None:
                return self._settle(row, Status.DONE, bound, "recovered_already_filed", copy_uid=copy)
            if in_source:
                item = self.refetch(row.uid) if row.action == "header" else None
                self.act(row.action, row.uid, decision, item, row.uidvalidity, why=self._why(row.explanation))
                return self._settle(row, Status.DONE, bound, "recovered_redone")
            return self._settle(
                row, Status.FAILED, bound, "recovered_vanished",
                "message is neither in the source mailbox (same UIDVALIDITY) nor in its destination; "
                "someone moved or deleted it, or UIDVALIDITY changed (it will be seen again by Message-ID)",
            )
        except MailboxError as exc:
            # Copy made but original not removable: stay 'pending', so the next connect tries again.
            # Otherwise the message is in the source only: retried after a backoff.
            status = Status.PENDING if copy is not None and in_source else Status.FAILED
            bound.error("recovery_failed", error=str(exc), status=status)
            if status == Status.FAILED:
                self.failed_attempt(row.uid, row.uidvalidity, str(exc))
            else:
                self.state.set_status(self.account.name, self.mailbox, row.uidvalidity, row.uid, status, str(exc))
            return status

    def _settle(
        self, row: MessageRow, status: Status, bound: Any, event: str, error: str | None = None, **kw: Any
    ) -> Status:
        self.state.set_status(self.account.name, self.mailbox, row.uidvalidity, row.uid, status, error)
        (bound.info if status == Status.DONE else bound.warning)(event, status=status, **kw)
        return status

    def refetch(self, uid: int) -> Fetched:
        """The whole message again (the header action copies it byte for byte)."""
        data = self._link().client.fetch([uid], ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]).get(uid)
        if data is None:
            raise MailboxError(f"uid={uid} vanished from {self.mailbox!r} during recovery")
        raw = data[b"BODY[]"]
        return Fetched(uid, raw, tuple(data.get(_FLAGS, ())), data.get(_DATE), message_key(raw), time.monotonic(),
                       content_fingerprint(raw))

    # ---- reporting ---------------------------------------------------------------------------

    def _done(self, item: Fetched, decision: Decision, outcome: str, folder: str, **extra: Any) -> None:
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

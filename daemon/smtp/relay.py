"""The SMTP content filter (DESIGN data flow 2): receive, classify, tag, relay to the next hop.

Mail only counts as accepted once the next hop accepted it: the sender gets 250 for DATA only
after the next hop said 250 for the tagged message, and every failure before that answers 451,
so the sender's MTA keeps the message and retries; nothing is ever lost in between.

No next-hop connection is held while a client dawdles (slow or idle clients would otherwise hold
the next hop's connections and transactions open as long as they like): each RCPT is checked with
the next hop on a short connection of its own (MAIL, RCPT, QUIT), so a recipient the next hop
refuses is refused to the sender with the next hop's own 5xx; the message itself goes over a new
connection opened only once DATA is complete and classified. A recipient the next hop accepted at
RCPT but refuses at delivery makes the whole message a 451 (nothing was delivered): the sender's
retry then hears the next hop's verdict for that recipient at RCPT.

Runs on the service's event loop (aiosmtpd's ``SMTP`` protocol via ``loop.create_server``);
classification goes through the service's single inference worker; the next-hop client
(``mailtriage.smtp.nexthop``, blocking smtplib) runs in worker threads. Importing this module does
not import torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, AnyStr, Protocol

import structlog
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from mailtriage.config import Config
from mailtriage.core.pipeline import UNKNOWN_KEY, ClassifyAsync, Rules, classify_and_route_async, prepare
from mailtriage.core.routing import Decision
from mailtriage.core.envelope import Envelope as MailEnvelope, envelope_of
from mailtriage.core.explain import Explanation, why_header
from mailtriage.core.tagging import category_value, tagged_parts
from mailtriage.errors import ConfigError
from mailtriage import metrics
from mailtriage.smtp.nexthop import NextHop, NextHopFailure, check_recipient, deliver, reply_text

if TYPE_CHECKING:
    from mailtriage.service.app import Service

log = structlog.get_logger(__name__)


class RecordFn(Protocol):
    """Records one tagged message's decision (StateDB.record_relayed)."""

    def __call__(self, key: str, decision: Decision, model_version: str, *,
                 explanation: Explanation | None = None, envelope: MailEnvelope | None = None) -> None: ...


# Postfix's default message_size_limit is 10 MB; 50 MB leaves room for big attachments while
# bounding what one transaction holds in memory (aiosmtpd buffers the whole message).
DATA_SIZE_LIMIT = 50 * 1024 * 1024
# All of classify + relay must end before the sender's own wait for our reply to its final dot
# (RFC 5321 §4.5.3.2.6: 10 minutes): ``[smtp] relay_timeout`` bounds it as a whole.
RELAY_TIMEOUT = 300.0
CLOSE_GRACE = 10.0  # seconds a shutdown waits for messages being relayed before dropping them
# A session that has made no mail progress (MAIL, RCPT, message bytes) for this long gives up its
# place when the server is full and a new client connects: idle sessions cannot lock real mail out.
EVICT_AFTER = 5.0
# Messages up to this size are held in memory while they arrive; larger ones go to a temporary
# file, read back as one bytes object once complete: no list of lines, no second copy.
SPOOL_AT = 1024 * 1024
_LINE_BREAK = re.compile(rb"[\r\n]")

TEMPFAIL = "451 4.3.0 mailtriage: {why}; try again later"
NO_ROOM = "452 4.3.1 mailtriage: too many message bytes in flight; try again later"
NEEDS_SMTPUTF8 = "553 5.6.7 mailtriage: a non-ASCII address needs MAIL FROM:<...> SMTPUTF8"


def sender_reply(failure: NextHopFailure, where: str) -> str:
    """What the sender hears when the next hop failed: its 5xx as-is, anything else a 451."""
    if failure.permanent:
        return f"{failure.code} {failure.text}".rstrip()
    return TEMPFAIL.format(why=f"next hop {where} failed ({failure})")


class ContentFilter:
    """aiosmtpd handler for ONE client connection: checks recipients, relays complete messages."""

    def __init__(
        self, rules: Rules, classify: ClassifyAsync, hop: NextHop, record: RecordFn | None = None,
        relay_timeout: float = RELAY_TIMEOUT, why_header: bool = False,
    ) -> None:
        self.rules = rules
        self.classify = classify
        self.hop = hop
        self.record = record  # StateDB.record_relayed: the decision into the state DB, for stats/corrections
        self.relay_timeout = relay_timeout
        self.why_header = why_header  # add X-Mailtriage-Why (config why_header)
        self.busy = False  # classifying or relaying a message right now (no timeout ends the session)

    # -- envelope: nothing is held open at the next hop -----------------------------------

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if not _utf8_allowed(address, mail_options):
            return NEEDS_SMTPUTF8
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        sender = envelope.mail_from
        if sender is None:
            return "503 5.5.1 Error: need MAIL command"
        if not _utf8_allowed(address, envelope.mail_options):
            return NEEDS_SMTPUTF8
        try:
            await asyncio.to_thread(check_recipient, self.hop, sender, envelope.mail_options, address)
        except NextHopFailure as failure:
            log.warning(
                "smtp_next_hop_refused", stage=failure.stage, peer=_peer(session), next_hop=str(self.hop),
                reply=str(failure),
            )
            return sender_reply(failure, str(self.hop))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    # -- content: classify, tag, relay ----------------------------------------------------

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sender, recipients = envelope.mail_from, list(envelope.rcpt_tos)
        if sender is None or not recipients:
            return "503 5.5.1 Error: need MAIL and RCPT"
        self.busy = True
        started = time.monotonic()
        # Everything from here to our reply fits in relay_timeout, well inside the sender's own
        # 10 minutes (RFC 5321 §4.5.3.2.6): a sender that gave up would retry and duplicate.
        deadline = started + self.relay_timeout
        raw = _content_bytes(envelope)
        bound = log.bind(peer=_peer(session), recipients=len(recipients), size=len(raw))
        try:
            try:
                text, key = await asyncio.to_thread(prepare, raw)
                bound = bound.bind(message=key)
                (routed,) = await asyncio.wait_for(
                    classify_and_route_async([text], self.classify, self.rules), deadline - time.monotonic()
                )
                decision, version = routed.decision, routed.model_version
                why = why_header(routed.explanation) if self.why_header and routed.explanation else None
                tagged = await asyncio.to_thread(tagged_parts, raw, decision, why)
            except Exception as exc:  # noqa: BLE001 - the sender keeps the message and retries
                bound.error("smtp_classify_failed", error=str(exc) or type(exc).__name__,
                            error_type=type(exc).__name__, exc_info=not isinstance(exc, TimeoutError))
                return TEMPFAIL.format(why="could not classify the message")
            if _client_gone(server):  # the client left: relaying now would make its retry a duplicate
                bound.warning("smtp_client_gone_before_relay")
                return TEMPFAIL.format(why="client gone")
            try:
                queued = await asyncio.to_thread(
                    deliver, self.hop, sender, list(envelope.mail_options), recipients, tagged, deadline
                )
            except NextHopFailure as failure:
                metrics.MESSAGES.labels(category=decision.label, outcome="failed").inc()
                bound.warning("smtp_next_hop_refused", stage=failure.stage, next_hop=str(self.hop), reply=str(failure))
                return sender_reply(failure, str(self.hop))
        finally:
            self.busy = False
        if self.record is not None and key != UNKNOWN_KEY:
            try:
                record = self.record  # the subject and sender for the console are parsed in the thread too
                await asyncio.to_thread(lambda: record(key, decision, version, explanation=routed.explanation,
                                                       envelope=envelope_of(raw)))
            except Exception as exc:  # noqa: BLE001 - the next hop has it: a 4xx now would duplicate it
                bound.error("smtp_decision_not_recorded", error=str(exc), error_type=type(exc).__name__)
        outcome = "unsure" if decision.unsure else "filed"
        metrics.MESSAGES.labels(category=decision.label, outcome=outcome).inc()
        metrics.LATENCY.observe(time.monotonic() - started)
        bound.info(
            "smtp_relayed",
            category=category_value(decision),
            label=decision.label,
            confidence=round(decision.confidence, 4),
            model=version,
            next_hop=str(self.hop),
            next_hop_reply=queued,
            client_gone=_client_gone(server),
        )
        return f"250 2.0.0 OK relayed as {reply_text(category_value(decision))}"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer a permanent 500: a content filter must make the sender retry.
        _note_handler_error(error)
        return TEMPFAIL.format(why="internal error")


def _client_gone(server: SMTP) -> bool:
    return server.transport is None or bool(getattr(server, "gone", False))


def _utf8_allowed(address: str, mail_options: Sequence[str]) -> bool:
    # A non-ASCII address needs MAIL ... SMTPUTF8 (RFC 6531 §3.4); without it smtplib cannot send it
    # on and the sender got a 451 on every retry (found by the SMTP fuzzer). RFC 6531 §3.5: 553 5.6.7.
    return address.isascii() or any(opt.upper() == "SMTPUTF8" for opt in mail_options)


def _content_bytes(envelope: Envelope) -> bytes:
    content: Any = envelope.original_content if envelope.original_content is not None else envelope.content
    if isinstance(content, str):
        return content.encode("utf-8", "surrogateescape")
    return bytes(content or b"")


def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


class _Budget:
    """Message bytes in flight across all sessions (received, being classified or relayed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def spent(self, more: int = 0) -> bool:
        return self.used + max(more, 1) > self.limit

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


def default_bytes_in_flight(max_message_size: int, max_connections: int) -> int:
    """``[smtp] max_bytes_in_flight = 0``: a quarter of the host's memory, at least one message of
    the largest size, at most every connection with one. A message costs about its size once in
    memory while it is classified and relayed (larger ones arrive into a temporary file)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 4 * 1024**3
    return max(max_message_size, min(max_connections * max_message_size, memory // 4))


class _Spool:
    """One message as it arrives: in memory up to SPOOL_AT bytes, then in an unlinked temporary file."""

    def __init__(self, spool_dir: str | None) -> None:
        self._dir = spool_dir
        self._mem = bytearray()
        self._file: Any = None
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None and len(self._mem) + len(data) <= SPOOL_AT:
            self._mem += data
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._dir, buffering=256 * 1024)  # 0600, no name
            self._file.write(self._mem)
            self._mem = bytearray()
        self._file.write(data)

    def read(self) -> bytes:
        """The whole message as one bytes object (read back from the file in one allocation)."""
        if self._file is None:
            return bytes(self._mem)
        self._file.flush()
        self._file.seek(0)
        return bytes(self._file.read())

    def close(self) -> None:
        self._mem = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None


class _FilterSMTP(SMTP):
    """aiosmtpd's protocol with the content filter's limits.

    Bounds what idle or hostile clients can hold: beyond ``max_connections`` a new connection takes
    the place of the session that has made no mail progress for longest (at least EVICT_AFTER s;
    it is told 421), else it is answered 421 and closed before any session exists. Only mail
    progress (MAIL or RCPT accepted, message bytes arriving) restarts the idle timeout; NOOP,
    RSET, HELO and the like do not. No timeout ends a session while its message is classified
    or relayed; a session ends with 421 after ``session_lifetime`` seconds whatever it sends,
    but a message being relayed at that moment is finished first. Message bytes in flight across
    sessions are bounded by ``budget``: beyond it MAIL and DATA get 452.
    """

    def __init__(
        self,
        handler: ContentFilter,
        registry: set[_FilterSMTP],
        *,
        max_connections: int,
        session_lifetime: float,
        budget: _Budget,
        evict_after: float = EVICT_AFTER,
        spool_dir: str | None = None,
        on_orphan: Callable[[asyncio.Future[Any]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._registry = registry
        self._max_connections = max_connections
        self._session_lifetime = session_lifetime
        self._budget = budget
        self._evict_after = evict_after
        self._spool_dir = spool_dir
        self._on_orphan = on_orphan
        self._lifetime_handle: asyncio.TimerHandle | None = None
        self._refused = False
        self._last_progress = self.loop.time()
        self._in_command = False  # a RCPT being checked with the next hop, a message arriving
        self.gone = False  # the client hung up (EOF or connection lost)

    # -- who gets a place --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and len(self._registry) >= self._max_connections:
            victim = self._idlest()
            if victim is None:
                self._refused = True
                _note_refused(len(self._registry))
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(b"421 4.7.0 mailtriage: too many connections; try again later\r\n")
                transport.close()
                return
            victim._close_with(b"421 4.7.0 mailtriage: idle session closed to serve another client",
                               "smtp_idle_evicted", held=len(self._registry))
        self._registry.add(self)
        self._last_progress = self.loop.time()
        super().connection_made(transport)
        if self._lifetime_handle is None:
            self._lifetime_handle = self.loop.call_later(self._session_lifetime, self._lifetime_over)

    def _idle_for(self, now: float) -> float:
        if self.event_handler.busy or self._in_command or self.transport is None:
            return -1.0
        return now - self._last_progress

    def _idlest(self) -> _FilterSMTP | None:
        now = self.loop.time()
        best = max(self._registry, key=lambda c: c._idle_for(now), default=None)
        if best is None or best._idle_for(now) < self._evict_after:
            return None
        return best

    def _close_with(self, reply: bytes, event: str, **fields: Any) -> None:
        self._registry.discard(self)  # its place is free now, not when the close completes
        transport = self.transport
        if transport is None:
            return
        log.info(event, peer=_peer(self.session) if self.session else "?",
                 idle_s=round(self.loop.time() - self._last_progress, 1), **fields)
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(reply + b"\r\n")
        transport.close()

    # -- idle means no mail progress ----------------------------------------------------------

    def _progress(self) -> None:
        self._last_progress = self.loop.time()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd restarts its idle timer before every command, NOOP included: 100 clients sending
        # NOOP every 20 s held every place forever. The timer starts once; _timeout_cb measures
        # from the last mail progress.
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_later(duration or self._timeout_duration, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        now = self.loop.time()
        if self.event_handler.busy:
            # Classifying or relaying: the sender waits for our reply; cutting it off would make
            # it retry a message the next hop may have queued (a duplicate). relay_timeout bounds it.
            wait = self._timeout_duration
        else:
            wait = self._last_progress + self._timeout_duration - now
        if wait > 0:
            self._timeout_handle = self.loop.call_later(wait, self._timeout_cb)
            return
        self._close_with(b"421 4.4.2 mailtriage: idle too long; closing", "smtp_idle_timeout")

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._budget.spent(_declared_size(arg)):
            # RFC 1870: 452 for a temporary lack of room; the sender retries later.
            await self.push(NO_ROOM)
            return
        assert self.envelope is not None
        before = self.envelope.mail_from
        await super().smtp_MAIL(arg)
        if self.envelope is not None and before is None and self.envelope.mail_from is not None:
            self._progress()

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.envelope is not None
        before = len(self.envelope.rcpt_tos)
        self._in_command = True
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._in_command = False
        if self.envelope is not None and len(self.envelope.rcpt_tos) > before:
            self._progress()

    # -- the message ------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        if self._budget.spent():
            await self.push(NO_ROOM)
            return
        self._in_command = True
        spool = _Spool(self._spool_dir)
        taken = 0
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            verdict = await self._receive(spool)
            taken = spool.size
            if verdict is not None:
                spool.close()
                self._set_post_data_state()
                await self.push(verdict)
                return
            raw = await asyncio.to_thread(spool.read)
            spool.close()
            self.envelope.content = self.envelope.original_content = raw
            del raw
            self._progress()
            # The handler runs as a task of its own: a client that leaves now (connection lost
            # cancels this coroutine) does not stop a relay already under way half-way, and what
            # it delivers is still recorded and logged.
            work = asyncio.ensure_future(self._call_handler_hook("DATA"))
            try:
                status = await asyncio.shield(work)
            except asyncio.CancelledError:
                if not work.done():
                    budget, held = self._budget, taken
                    taken = 0
                    work.add_done_callback(lambda _f: budget.give(held))
                    if self._on_orphan is not None:
                        self._on_orphan(work)
                raise
        finally:
            spool.close()
            self._budget.give(taken)
            self._in_command = False
        self._set_post_data_state()
        self._progress()
        await self.push("250 OK" if status is MISSING else status)

    async def _receive(self, spool: _Spool) -> str | None:
        """Read the message up to the lone dot into ``spool``: CRLF line endings (a bare CR or LF
        becomes CRLF here, once), dot-stuffing undone. Returns the error reply, or None."""
        # Lines longer than RFC 5321's 1,000 octets are accepted in DATA: the RFC (§4.5.3.1.6)
        # binds senders, and §4.5.3.1 asks receivers to impose no such limit where they can. Only
        # the message size limit holds; the stream reader's buffer limit is raised to it for DATA
        # and restored for commands (a command line stays limited to 512 octets, §4.5.3.1.4).
        limit = self.data_size_limit or DATA_SIZE_LIMIT
        reader: Any = self._reader
        reader._limit = limit + 1  # noqa: SLF001 - see above
        too_long = too_much = no_room = False
        size = 0
        try:
            while self.transport is not None:
                try:
                    line: bytes = await reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as exc:
                    too_long = True  # longer than the whole size limit: that message can never fit
                    await reader.read(exc.consumed)
                    continue
                self._progress()  # bytes are arriving: not idle, however long the message takes
                if line == b".\r\n":
                    break
                if too_long:
                    continue
                size += len(line)
                if size > limit:
                    too_much = True
                if too_much or no_room:
                    continue
                if line[:1] == b".":
                    line = line[1:]
                body = line[:-2]
                if b"\r" in body or b"\n" in body:
                    line = _BARE_EOL.sub(b"\r\n", body) + b"\r\n"
                if not self._budget.take(len(line)):
                    # Out of room: give back what this message holds at once, so that the other
                    # messages arriving now can finish instead of all failing together.
                    no_room = True
                    self._budget.give(spool.size)
                    spool.close()
                    spool.size = 0
                    continue
                spool.write(line)
        finally:
            reader._limit = SMTP.line_length_limit
        if too_long:
            return "500 Line too long (see RFC5321 4.5.3.1.6)"
        if too_much:
            return "552 Error: Too much mail data"
        if no_room:
            return NO_ROOM
        return None

    # -- replies and addresses ----------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        # aiosmtpd echoes client text in some replies ("502 Could not VRFY ...", unknown commands).
        # Bytes that are not UTF-8 (kept as lone surrogates) made its encode raise: a 451 and a
        # logged traceback per hostile command, found by the fuzzer. A bare CR or LF in the echo
        # would also break the reply line. Each push is one reply line.
        data = status.encode("utf-8", "replace") if isinstance(status, str) else bytes(status)
        await super().push(_LINE_BREAK.sub(b" ", data).rstrip())

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd answers "501 Syntax" for an empty address and "553 5.1.3 malformed address"
        # for None. Its parser raises IndexError on "MAIL FROM:<" (a 451 and a traceback before):
        # that is a 501 now. An address with NUL or other control characters, or with bytes that
        # are not UTF-8 (surrogateescape leaves lone surrogates), gets the 553 instead of being
        # forwarded or failing at the next hop with a 451.
        try:
            address, rest = super()._getaddr(arg)
        except Exception:  # noqa: BLE001 - any parser failure is the client's syntax error
            return "", None
        if address is not None and not _acceptable_address(address):
            return None, None
        return address, rest

    def _lifetime_over(self) -> None:
        self._lifetime_handle = None
        if self.transport is None:
            return
        if self.event_handler.busy:  # never cut a relay short: look again in a moment
            self._lifetime_handle = self.loop.call_later(1.0, self._lifetime_over)
            return
        self._close_with(b"421 4.4.2 mailtriage: session lifetime over; closing", "smtp_session_lifetime_over",
                         lifetime=self._session_lifetime)

    def eof_received(self) -> bool | None:
        self.gone = True
        return super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        self.gone = True
        if self._refused:
            return  # no session was ever started for it
        self._registry.discard(self)
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
            self._lifetime_handle = None
        super().connection_lost(error)


_BARE_EOL = re.compile(rb"\r\n|\r|\n")
_SIZE_PARAM = re.compile(r"\bSIZE=(\d{1,20})\b", re.IGNORECASE)


def _declared_size(arg: str | None) -> int:
    match = _SIZE_PARAM.search(arg or "")
    return int(match.group(1)) if match else 0


def _acceptable_address(address: str) -> bool:
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in address)


_refused_log = {"last": 0.0, "count": 0}


def _note_refused(held: int) -> None:
    # A flood of connections must not become a flood of log lines: one line per 10 s at most.
    _refused_log["count"] += 1
    metrics.SMTP_REFUSED.inc()
    now = time.monotonic()
    if now - _refused_log["last"] >= 10.0:
        log.warning("smtp_too_many_connections", held=held, refused_since_last=_refused_log["count"])
        _refused_log["last"], _refused_log["count"] = now, 0


_handler_error_log = {"last": float("-inf"), "count": 0}


def _note_handler_error(error: Exception) -> None:
    # A bug that any client can trigger must not become a traceback per command (a fuzz run once
    # logged 188k of them): one line with its traceback per 10 s at most, counting the ones in between.
    _handler_error_log["count"] += 1
    now = time.monotonic()
    if now - _handler_error_log["last"] >= 10.0:
        log.error("smtp_handler_error", error=str(error), error_type=type(error).__name__, exc_info=error,
                  errors_since_last=_handler_error_log["count"])
        _handler_error_log["last"], _handler_error_log["count"] = now, 0


class SmtpFilter:
    """The listening content filter on the running loop: ``await start()``, ``await close()``."""

    def __init__(
        self,
        config: Config,
        classify: ClassifyAsync,
        *,
        host: str | None = None,
        port: int | None = None,
        next_hop: NextHop | None = None,
        data_size_limit: int = DATA_SIZE_LIMIT,
        hostname: str | None = None,
        max_connections: int | None = None,
        idle_timeout: float | None = None,
        session_lifetime: float | None = None,
        record: RecordFn | None = None,
        relay_timeout: float | None = None,
        max_bytes_in_flight: int | None = None,
        evict_after: float = EVICT_AFTER,
        spool_dir: str | None = None,
    ) -> None:
        smtp = config.smtp
        self.config = config
        self.classify = classify
        self.record = record
        self.host = host if host is not None else smtp.listen_host
        self.port = port if port is not None else smtp.listen_port
        self.next_hop = next_hop
        self.data_size_limit = data_size_limit
        self.hostname = hostname
        self.max_connections = max_connections if max_connections is not None else smtp.max_connections
        self.idle_timeout = idle_timeout if idle_timeout is not None else smtp.idle_timeout
        self.session_lifetime = session_lifetime if session_lifetime is not None else smtp.session_lifetime
        self.relay_timeout = relay_timeout if relay_timeout is not None else smtp.relay_timeout
        budget = max_bytes_in_flight if max_bytes_in_flight is not None else smtp.max_bytes_in_flight
        if not budget:
            budget = default_bytes_in_flight(data_size_limit, self.max_connections)
        self.budget = _Budget(budget)
        self.evict_after = evict_after
        self.spool_dir = spool_dir  # None: the system's temporary directory (TMPDIR)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_FilterSMTP] = set()
        self._orphans: set[asyncio.Future[Any]] = set()  # relays whose client left before the reply

    async def start(self) -> None:
        """Listen; raises ConfigError when the address cannot be bound. ``port`` 0 picks a free one."""
        loop = asyncio.get_running_loop()
        # aiosmtpd logs a WARNING for every unrecognised command of any client ("unrecognised: X",
        # "too many bogus commands"): a hostile client could fill the journal at will. Its errors
        # still show; what matters of a session is in our own events.
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        if self.hostname is None:
            # getfqdn may wait on DNS: once, off the loop, not per connection as aiosmtpd would.
            self.hostname = await asyncio.to_thread(socket.getfqdn)
        if self.next_hop is None:
            smtp = self.config.smtp
            self.next_hop = NextHop(smtp.next_hop_host, smtp.next_hop_port, local_hostname=self.hostname)
        hop, hostname = self.next_hop, self.hostname
        rules = Rules.of(self.config)

        def orphan(work: asyncio.Future[Any]) -> None:
            self._orphans.add(work)
            work.add_done_callback(self._orphans.discard)

        def factory() -> _FilterSMTP:
            return _FilterSMTP(
                ContentFilter(rules, self.classify, hop, self.record, relay_timeout=self.relay_timeout,
                              why_header=self.config.why_header),
                self._connections,
                max_connections=self.max_connections,
                session_lifetime=self.session_lifetime,
                budget=self.budget,
                evict_after=self.evict_after,
                spool_dir=self.spool_dir,
                on_orphan=orphan,
                timeout=self.idle_timeout,
                data_size_limit=self.data_size_limit,
                enable_SMTPUTF8=True,
                hostname=hostname,
                ident="mailtriage content filter",
                loop=loop,
            )

        try:
            self._server = await loop.create_server(factory, host=self.host, port=self.port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for SMTP on {self.host}:{self.port}: {exc.strerror or exc}; pick a free "
                "[smtp] listen_port (and make the upstream MTA's content_filter point at it)"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("smtp_filter_started", listen=f"{self.host}:{self.port}", next_hop=str(hop),
                 data_size_limit=self.data_size_limit, max_connections=self.max_connections,
                 idle_timeout=self.idle_timeout, session_lifetime=self.session_lifetime,
                 relay_timeout=self.relay_timeout, max_bytes_in_flight=self.budget.limit)

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop listening, let messages being relayed finish (up to ``grace`` s), drop the rest.

        A dropped client never got a 250, so its MTA still has the message and retries.
        """
        if self._server is None:
            return
        self._server.close()
        deadline = time.monotonic() + grace
        while any(c.event_handler.busy for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)  # let connection_lost hand the relays under way over to _orphans
        if self._orphans:
            # Already sending to the next hop: let it answer (relay_timeout bounds it) so that what
            # it queued is recorded and logged, not left to a thread nobody waits for.
            left = max(0.0, deadline - time.monotonic())
            _done, pending = await asyncio.wait(set(self._orphans), timeout=left)
            if pending:
                log.warning("smtp_relays_abandoned_at_shutdown", count=len(pending))
        await self._server.wait_closed()
        self._server = None
        await asyncio.sleep(0)  # let connection_lost callbacks run
        log.info("smtp_filter_stopped")


async def start_smtp_filter(service: Service) -> Callable[[], Awaitable[None]]:
    """The Service's on_start hook for ``[smtp] enabled = true``: classify on its inference worker."""
    state = service.state
    server = SmtpFilter(
        service.config, service.classify_async, data_size_limit=service.config.smtp.max_message_size,
        record=state.record_relayed if state is not None else None,
        # Large messages arrive into a file beside the state database: on disk, private to the
        # service, unlike a /tmp that may be a tmpfs (memory).
        spool_dir=os.path.dirname(os.path.abspath(service.config.state_path)),
    )
    await server.start()
    return server.close

"""The SMTP content filter (DESIGN data flow 2): receive, classify, tag, relay to the next hop.

Mail only counts as accepted once the next hop accepted it: the sender gets 250 for DATA only
after the next hop said 250 for the tagged message, and every failure before that answers 451,
so the sender's MTA keeps the message and retries; nothing is ever lost in between.

No next-hop connection is held while a client dawdles (issue 8 item 6): each RCPT is checked with
the next hop on a short connection of its own (MAIL, RCPT, QUIT), so a recipient the next hop
refuses is refused to the sender with the next hop's own 5xx; the message itself goes over a new
connection opened only once DATA is complete and classified. A recipient the next hop accepted at
RCPT but refuses at delivery makes the whole message a 451 (nothing was delivered): the sender's
retry then hears the next hop's verdict for that recipient at RCPT.

Runs on the service's event loop (aiosmtpd's ``SMTP`` protocol via ``loop.create_server``);
classification goes through the service's single inference worker; smtplib runs in worker
threads. Importing this module does not import torch.
"""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AnyStr

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from mailtriage import metrics
from mailtriage.core.tagging import add_headers, category_value
from mailtriage.core.classifier import Prediction
from mailtriage.config import Config
from mailtriage.errors import ConfigError
from mailtriage.core.mailtext import mail_text, message_key
from mailtriage.core.routing import Decision, decide

if TYPE_CHECKING:
    from mailtriage.service.app import Service

log = structlog.get_logger(__name__)

ClassifyAsync = Callable[[Sequence[str]], Awaitable[tuple[list[Prediction], str]]]
RecordFn = Callable[[str, Decision, str], None]  # (message key, decision, model version)

# Postfix's default message_size_limit is 10 MB; 50 MB leaves room for big attachments while
# bounding what one transaction holds in memory (aiosmtpd buffers the whole message).
DATA_SIZE_LIMIT = 50 * 1024 * 1024
NEXT_HOP_TIMEOUT = 60.0  # seconds per next-hop command; a wedged next hop becomes a 451
# The reply to the message's final dot: RFC 5321 §4.5.3.2.6 asks for 10 minutes. A 451 after the next
# hop has queued the message would make the sender retry and deliver it twice, so wait long here
# (the upstream Postfix waits smtp_data_done_timeout, 1200 s in the README's master.cf).
DATA_DONE_TIMEOUT = 600.0
CLOSE_GRACE = 10.0  # seconds a shutdown waits for messages being relayed before dropping them
_HEADER_ALLOWANCE = 256  # bytes our two headers add at most; added to a forwarded SIZE=
_MAX_REPLY_TEXT = 400
_LINE_BREAK = re.compile(rb"[\r\n]")

TEMPFAIL = "451 4.3.0 mailtriage: {why}; try again later"
NEEDS_SMTPUTF8 = "553 5.6.7 mailtriage: a non-ASCII address needs MAIL FROM:<...> SMTPUTF8"


class NextHopFailure(Exception):
    """The next hop refused (code = its reply code) or could not be reached (code = None)."""

    def __init__(self, code: int | None, text: str, stage: str = "") -> None:
        super().__init__(f"{code} {text}" if code is not None else text)
        self.code = code
        self.text = text
        self.stage = stage  # MAIL, RCPT or DATA: the command the next hop failed

    @property
    def permanent(self) -> bool:
        return self.code is not None and 500 <= self.code < 600


def reply_text(message: bytes | str) -> str:
    """A next-hop reply text made safe to put on one SMTP reply line of ours."""
    text = message.decode("ascii", "replace") if isinstance(message, bytes) else message
    text = " ".join(text.replace("\x00", " ").split())
    return text[:_MAX_REPLY_TEXT]


def sender_reply(failure: NextHopFailure, where: str) -> str:
    """What the sender hears when the next hop failed: its 5xx as-is, anything else a 451."""
    if failure.permanent:
        return f"{failure.code} {failure.text}".rstrip()
    return TEMPFAIL.format(why=f"next hop {where} failed ({failure})")


def forward_mail_options(options: Sequence[str], has_extn: Callable[[str], bool]) -> list[str]:
    """The sender's MAIL parameters the next hop understands (aiosmtpd admits only these three)."""
    out: list[str] = []
    for opt in options:
        key, _, value = opt.upper().partition("=")
        if key == "BODY" and has_extn("8bitmime"):
            out.append(f"BODY={value}")
        elif key == "SMTPUTF8":
            out.append("SMTPUTF8")  # smtplib refuses it when the next hop lacks it: a 451 here
        elif key == "SIZE" and value.isdigit() and has_extn("size"):
            out.append(f"SIZE={int(value) + _HEADER_ALLOWANCE}")
    return out


@dataclass(frozen=True)
class NextHop:
    host: str
    port: int
    timeout: float = NEXT_HOP_TIMEOUT
    local_hostname: str = "localhost"
    data_timeout: float = DATA_DONE_TIMEOUT

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class NextHopTransaction:
    """One connection to the next hop over smtplib (blocking: call it from a worker thread)."""

    def __init__(self, hop: NextHop) -> None:
        self.hop = hop
        self._smtp: smtplib.SMTP | None = None

    def mail(self, sender: str, options: Sequence[str]) -> None:
        try:
            smtp = smtplib.SMTP(self.hop.host, self.hop.port, self.hop.local_hostname, timeout=self.hop.timeout)
            self._smtp = smtp
            smtp.ehlo_or_helo_if_needed()
            code, msg = smtp.mail(sender, forward_mail_options(options, smtp.has_extn))
        except smtplib.SMTPResponseException as exc:
            raise NextHopFailure(exc.smtp_code, reply_text(exc.smtp_error), "MAIL") from exc
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, or an address smtplib cannot encode
            raise NextHopFailure(None, f"{type(exc).__name__}: {exc}", "MAIL") from exc
        if code != 250:
            raise NextHopFailure(code, reply_text(msg), "MAIL")

    def rcpt(self, recipient: str) -> None:
        code, msg = self._call(lambda smtp: smtp.rcpt(recipient), "RCPT")
        if code not in (250, 251):
            raise NextHopFailure(code, reply_text(msg), "RCPT")

    def data(self, message: bytes) -> str:
        """Send the message; returns the next hop's 250 text (it usually names its queue id)."""
        def send(smtp: smtplib.SMTP) -> tuple[int, bytes]:
            if smtp.sock is not None:  # the final reply may take long (RFC 5321 §4.5.3.2.6: 10 min)
                smtp.sock.settimeout(max(self.hop.timeout, self.hop.data_timeout))
            return smtp.data(message)

        code, msg = self._call(send, "DATA")
        if code != 250:
            raise NextHopFailure(code, reply_text(msg), "DATA")
        return reply_text(msg)

    def _call(self, op: Callable[[smtplib.SMTP], tuple[int, bytes]], stage: str) -> tuple[int, bytes]:
        if self._smtp is None:
            raise NextHopFailure(None, "the connection to the next hop is closed", stage)
        try:
            return op(self._smtp)
        except smtplib.SMTPResponseException as exc:  # e.g. SMTPDataError: DATA refused
            raise NextHopFailure(exc.smtp_code, reply_text(exc.smtp_error), stage) from exc
        except Exception as exc:  # noqa: BLE001 - whatever it was, the next hop did not accept
            raise NextHopFailure(None, f"{type(exc).__name__}: {exc}", stage) from exc

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()  # an unfinished transaction is abandoned: the next hop discards it
        except (OSError, smtplib.SMTPException):
            smtp.close()


def check_recipient(hop: NextHop, sender: str, options: Sequence[str], recipient: str) -> None:
    """Ask the next hop whether it takes ``recipient`` from ``sender``, then hang up (blocking).

    Raises NextHopFailure with its verdict. The connection lives for these three commands only.
    """
    tx = NextHopTransaction(hop)
    try:
        tx.mail(sender, options)
        tx.rcpt(recipient)
    finally:
        tx.close()


def deliver(hop: NextHop, sender: str, options: Sequence[str], recipients: Sequence[str], message: bytes) -> str:
    """Relay the complete message on a new connection (blocking); returns the next hop's 250 text.

    A recipient refused now, after the next hop accepted it at RCPT, aborts the transaction before
    DATA (nothing delivered to anyone) with a temporary failure: one reply to DATA cannot refuse
    one recipient, and the retry's RCPT check will carry the next hop's verdict for it.
    """
    tx = NextHopTransaction(hop)
    try:
        tx.mail(sender, options)
        for recipient in recipients:
            try:
                tx.rcpt(recipient)
            except NextHopFailure as failure:
                raise NextHopFailure(
                    None, f"refused <{recipient}> at delivery after accepting it ({failure})", "RCPT"
                ) from failure
        return tx.data(message)
    finally:
        tx.close()


class ContentFilter:
    """aiosmtpd handler for ONE client connection: checks recipients, relays complete messages."""

    def __init__(self, config: Config, classify: ClassifyAsync, hop: NextHop, record: RecordFn | None = None) -> None:
        self.config = config
        self.classify = classify
        self.hop = hop
        self.record = record  # StateDB.record_relayed: the decision into the state DB, for stats/corrections
        self.busy = False  # relaying a message right now (shutdown waits for it)

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
        raw = _content_bytes(envelope)
        bound = log.bind(peer=_peer(session), recipients=len(recipients), size=len(raw))
        try:
            try:
                text, key = await asyncio.to_thread(_prepare, raw)
                bound = bound.bind(message=key)
                predictions, version = await self.classify([text])
                decision = decide(
                    predictions[0], self.config.model.threshold, self.config.categories, self.config.unsure_folder
                )
                tagged = await asyncio.to_thread(add_headers, raw, decision)
            except Exception as exc:  # noqa: BLE001 - the sender keeps the message and retries
                bound.error("smtp_classify_failed", error=str(exc), error_type=type(exc).__name__, exc_info=True)
                return TEMPFAIL.format(why="could not classify the message")
            try:
                queued = await asyncio.to_thread(
                    deliver, self.hop, sender, list(envelope.mail_options), recipients, tagged
                )
            except NextHopFailure as failure:
                metrics.MESSAGES.labels(category=decision.label, outcome="failed").inc()
                bound.warning("smtp_next_hop_refused", stage=failure.stage, next_hop=str(self.hop), reply=str(failure))
                return sender_reply(failure, str(self.hop))
        finally:
            self.busy = False
        if self.record is not None and key != "unknown":
            try:
                await asyncio.to_thread(self.record, key, decision, version)
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
        )
        return f"250 2.0.0 OK relayed as {reply_text(category_value(decision))}"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer a permanent 500: a content filter must make the sender retry.
        _note_handler_error(error)
        return TEMPFAIL.format(why="internal error")


def _utf8_allowed(address: str, mail_options: Sequence[str]) -> bool:
    # A non-ASCII address needs MAIL ... SMTPUTF8 (RFC 6531 §3.4); without it smtplib cannot send it
    # on and the sender got a 451 on every retry (found by the SMTP fuzzer). RFC 6531 §3.5: 553 5.6.7.
    return address.isascii() or any(opt.upper() == "SMTPUTF8" for opt in mail_options)


def _prepare(raw: bytes) -> tuple[str, str]:
    # mail_text never raises; message_key is only for the logs, so it may not stop a relay either.
    try:
        key = message_key(raw)
    except Exception:  # noqa: BLE001
        key = "unknown"
    return mail_text(raw), key


def _content_bytes(envelope: Envelope) -> bytes:
    content: Any = envelope.original_content if envelope.original_content is not None else envelope.content
    if isinstance(content, str):
        return content.encode("utf-8", "surrogateescape")
    return bytes(content or b"")


def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


class _FilterSMTP(SMTP):
    """aiosmtpd's protocol with the content filter's limits.

    Bounds what idle or hostile clients can hold (issue 8 item 6): beyond ``max_connections`` a
    connection is answered 421 and closed before any session exists; a session ends with 421
    after ``session_lifetime`` seconds whatever it sends (NOOP resets only the idle timeout), but
    a message being relayed at that moment is finished first.
    """

    def __init__(
        self,
        handler: ContentFilter,
        registry: set[_FilterSMTP],
        *,
        max_connections: int,
        session_lifetime: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._registry = registry
        self._max_connections = max_connections
        self._session_lifetime = session_lifetime
        self._lifetime_handle: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and len(self._registry) >= self._max_connections:
            self._refused = True
            _note_refused(len(self._registry))
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.7.0 mailtriage: too many connections; try again later\r\n")
            transport.close()
            return
        self._registry.add(self)
        super().connection_made(transport)
        if self._lifetime_handle is None:
            self._lifetime_handle = self.loop.call_later(self._session_lifetime, self._lifetime_over)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # Lines longer than RFC 5321's 1,000 octets are accepted in DATA (issue 8 item 8): the RFC
        # (§4.5.3.1.6) binds senders, and §4.5.3.1 asks receivers to impose no such limit where
        # they can; aiosmtpd answered a permanent "500 Line too long" and the sender bounced the
        # mail. Only the message size limit holds: aiosmtpd's line limit doubles as its stream
        # reader's buffer limit, so both are raised to it for DATA and restored for commands
        # (a command line stays limited to 512 octets, RFC 5321 §4.5.3.1.4). A single line longer
        # than the whole size limit still gets aiosmtpd's 500: that message can never fit.
        data_limit = (self.data_size_limit or DATA_SIZE_LIMIT) + 1
        reader: Any = self._reader
        self.line_length_limit, reader._limit = data_limit, data_limit  # noqa: SLF001 - see above
        try:
            await super().smtp_DATA(arg)
        finally:
            del self.line_length_limit  # back to the class attribute
            reader._limit = SMTP.line_length_limit

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
        # forwarded or failing at the next hop with a 451 (issue 8 item 8).
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
        log.info("smtp_session_lifetime_over", peer=_peer(self.session), lifetime=self._session_lifetime)
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(b"421 4.4.2 mailtriage: session lifetime over; closing\r\n")
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # no session was ever started for it
        self._registry.discard(self)
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
            self._lifetime_handle = None
        super().connection_lost(error)


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
    # A bug that any client can trigger must not become a traceback per command (the finding was
    # 188k tracebacks): one line with its traceback per 10 s at most, counting the ones in between.
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
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_FilterSMTP] = set()

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

        def factory() -> _FilterSMTP:
            return _FilterSMTP(
                ContentFilter(self.config, self.classify, hop, self.record),
                self._connections,
                max_connections=self.max_connections,
                session_lifetime=self.session_lifetime,
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
                 idle_timeout=self.idle_timeout, session_lifetime=self.session_lifetime)

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
    )
    await server.start()
    return server.close

"""The milter listener on the daemon's event loop: reads packets, drives a ``MilterSession`` per
connection, classifies at end of message under a deadline, writes the header edits back.

Postfix opens one milter connection per SMTP session (and per message for non-SMTP mail) and waits
for each answer at most ``milter_command_timeout`` (30 s) or, for message content and the final
answer, ``milter_content_timeout`` (300 s). Classification therefore runs under
``[milter] classify_timeout`` (below 300 s); past it, or on any model trouble, the answer is
``on_error``: a 451 (tempfail) or the message passed on untagged (accept). A broken or hostile
packet stream gets the connection closed, and the MTA applies its ``milter_default_action``.
Importing this module does not import torch or aiosmtpd.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from mailtriage.config import Config
from mailtriage.core.envelope import Envelope, envelope_of
from mailtriage.core.explain import Explanation, why_header
from mailtriage.core.pipeline import UNKNOWN_KEY, ClassifyAsync, Routed, Rules, classify_and_route_async, prepare
from mailtriage.core.routing import Decision
from mailtriage.core.tagging import category_value
from mailtriage.errors import ConfigError
from mailtriage.milter import protocol as p
from mailtriage.milter.session import Classify, Close, MilterSession, Send
from mailtriage import metrics

if TYPE_CHECKING:
    from mailtriage.service.app import Service

log = structlog.get_logger(__name__)


class RecordFn(Protocol):
    """Records one tagged message's decision (StateDB.record_relayed under intake "milter")."""

    def __call__(self, key: str, decision: Decision, model_version: str, *,
                 explanation: Explanation | None = None, envelope: Envelope | None = None) -> None: ...


CLOSE_GRACE = 10.0  # seconds a shutdown waits for messages being classified
WRITE_TIMEOUT = 30.0  # an MTA that stops reading our answer is dropped
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


async def classify_message(rules: Rules, classify: ClassifyAsync, raw: bytes) -> tuple[Routed, str]:
    """(routed, message key) for one message: mail text off the loop, then the pipeline every
    intake runs (classify on the inference worker, label check, route)."""
    text, key = await asyncio.to_thread(prepare, raw)
    (routed,) = await classify_and_route_async([text], classify, rules)
    return routed, key


class MilterServer:
    """``await start()``, ``await close()``. Keyword arguments override ``[milter]`` (tests)."""

    def __init__(
        self,
        config: Config,
        classify: ClassifyAsync,
        *,
        host: str | None = None,
        port: int | None = None,
        record: RecordFn | None = None,
        max_message_size: int | None = None,
        classify_timeout: float | None = None,
        idle_timeout: float | None = None,
        max_connections: int | None = None,
        max_packet: int = p.MAX_PACKET,
    ) -> None:
        milter = config.milter
        self.config = config
        self.classify = classify
        self.rules = Rules.of(config)
        self.record = record  # StateDB.record_relayed(intake="milter"): the decision, for stats/corrections
        self.host = host if host is not None else milter.listen_host
        self.port = port if port is not None else milter.listen_port
        self.on_error = milter.on_error
        self.max_message_size = max_message_size if max_message_size is not None else milter.max_message_size
        self.classify_timeout = classify_timeout if classify_timeout is not None else milter.classify_timeout
        self.idle_timeout = idle_timeout if idle_timeout is not None else milter.idle_timeout
        self.max_connections = max_connections if max_connections is not None else milter.max_connections
        self.max_packet = max_packet
        self.peak_held = 0  # most bytes one message held (the memory bound, checked by tests)
        self.errors = 0  # unexpected exceptions in a connection handler (a bug: tests expect 0)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._busy = 0

    async def start(self) -> None:
        """Listen; ConfigError when the address cannot be bound. ``port`` 0 picks a free one."""
        try:
            self._server = await asyncio.start_server(self._handle, host=self.host, port=self.port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for milter connections on {self.host}:{self.port}: {exc.strerror or exc}; pick a "
                "free [milter] listen_port and point Postfix's smtpd_milters (inet:HOST:PORT) at it"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("milter_started", listen=f"{self.host}:{self.port}", on_error=self.on_error,
                 max_message_size=self.max_message_size, classify_timeout=self.classify_timeout,
                 max_connections=self.max_connections)

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop listening, let messages being classified get their answer (up to ``grace`` s), then
        drop every connection: the MTA applies milter_default_action to what was in flight."""
        if self._server is None:
            return
        self._server.close()
        deadline = time.monotonic() + grace
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        log.info("milter_stopped")

    # -- one connection ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = _peer(writer)
        if len(self._connections) >= self.max_connections:
            # No answer is possible before OPTNEG; closing makes the MTA apply milter_default_action.
            _rate_limited("milter_too_many_connections", held=len(self._connections))
            writer.close()
            return
        self._connections.add(task)
        session = MilterSession(self.max_message_size, self.on_error)
        try:
            await self._converse(session, reader, writer, peer)
        except asyncio.CancelledError:
            pass  # shutdown
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the MTA hung up (normal after its QUIT, or when its SMTP client left)
        except TimeoutError:
            log.info("milter_idle_timeout", peer=peer, idle_timeout=self.idle_timeout)
        except p.ProtocolError as exc:
            _rate_limited("milter_protocol_error", peer=peer, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one connection's bug never takes the listener down
            self.errors += 1
            _rate_limited("milter_handler_error", peer=peer, error=str(exc), error_type=type(exc).__name__,
                          exc_info=exc)
        finally:
            self._connections.discard(task)
            self.peak_held = max(self.peak_held, session.peak_held)
            writer.close()

    async def _converse(
        self, session: MilterSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        sock = writer.get_extra_info("socket")
        while True:
            _ack_at_once(sock)
            code, payload = await asyncio.wait_for(self._read_packet(reader), self.idle_timeout)
            outcome = session.receive(code, p.parse_command(code, payload))
            if isinstance(outcome, Close):
                return
            if isinstance(outcome, Classify):
                packets = await self._end_of_message(session, outcome, peer)
            else:
                assert isinstance(outcome, Send)
                if outcome.note:
                    log.warning("milter_refused", peer=peer, reason=outcome.note)
                packets = outcome.packets
            if packets:
                writer.write(b"".join(packets))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    async def _read_packet(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        # The length is checked before the packet is read: a hostile length never becomes a buffer.
        n = p.packet_length(await reader.readexactly(p.LENGTH.size), self.max_packet)
        data = await reader.readexactly(n)
        return data[:1], data[1:]

    async def _end_of_message(self, session: MilterSession, message: Classify, peer: str) -> tuple[bytes, ...]:
        started = time.monotonic()
        bound = log.bind(peer=peer, size=message.size, truncated=message.truncated)
        self._busy += 1
        try:
            routed, key = await asyncio.wait_for(
                classify_message(self.rules, self.classify, message.raw), self.classify_timeout
            )
        except Exception as exc:  # noqa: BLE001 - model trouble, a timeout: on_error decides
            metrics.MESSAGES.labels(category="unknown", outcome="failed").inc()
            bound.error("milter_classify_failed", on_error=self.on_error, error=str(exc) or "timed out",
                        error_type=type(exc).__name__, timeout=self.classify_timeout)
            return session.failed()
        finally:
            self._busy -= 1
        decision, version = routed.decision, routed.model_version
        why = why_header(routed.explanation) if self.config.why_header and routed.explanation else None
        packets = session.tagged(decision, why)
        bound = bound.bind(message=key)
        if self.record is not None and key != UNKNOWN_KEY:
            try:
                record = self.record  # the subject and sender for the console are parsed in the thread too
                await asyncio.to_thread(lambda: record(key, decision, version, explanation=routed.explanation,
                                                       envelope=envelope_of(message.raw)))
            except Exception as exc:  # noqa: BLE001 - the mail must not wait on the state database
                bound.error("milter_decision_not_recorded", error=str(exc), error_type=type(exc).__name__)
        metrics.MESSAGES.labels(category=decision.label, outcome="unsure" if decision.unsure else "filed").inc()
        metrics.LATENCY.observe(time.monotonic() - started)
        bound.info("milter_tagged", category=category_value(decision), label=decision.label,
                   confidence=round(decision.confidence, 4), model=version, forged_removed=session_forged(packets))
        return packets


def session_forged(packets: Sequence[bytes]) -> int:
    """How many of the answer's packets delete a forged field (for the log line)."""
    return sum(1 for pkt in packets if pkt[4:5] == p.SMFIR_CHGHEADER)


def _ack_at_once(sock: Any) -> None:
    """Acknowledge the MTA's next packets at once instead of after the delayed-ACK timer.

    Postfix writes the packets that want no answer (macros, and headers with "no reply" negotiated)
    one write each, with Nagle's algorithm on, so each small write waits until the one before it
    is acknowledged. Our socket has been answering commands, so the kernel delays its ACKs (Linux:
    40 ms) hoping to ride them on an answer that never comes: that stalled every message by ~40 ms
    behind a real Postfix. TCP_QUICKACK ends that, but the kernel drops back to delayed ACKs after
    we answer, so it is set again before every read. Not a TCP socket, or not Linux: nothing to do.
    """
    if _TCP_QUICKACK is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except OSError:
        pass  # a connection already reset: the read that follows reports it


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:
        return f"{info[0]}:{info[1]}"
    return str(info)


_log_windows: dict[str, list[float]] = {}


def _rate_limited(event: str, **fields: object) -> None:
    # A broken or hostile peer must not become a flood of log lines: one per event per 10 s,
    # counting the ones in between.
    now = time.monotonic()
    last, count = _log_windows.get(event, [float("-inf"), 0.0])
    count += 1
    if now - last >= 10.0:
        log.warning(event, since_last=int(count), **fields)  # type: ignore[arg-type]
        _log_windows[event] = [now, 0.0]
    else:
        _log_windows[event] = [last, count]


async def start_milter(service: Service) -> Callable[[], Awaitable[None]]:
    """The Service's on_start hook for ``[milter] enabled = true``: classify on its inference worker,
    record decisions in the state database under the intake "milter"."""
    state = service.state
    record: RecordFn | None = None
    if state is not None:
        from mailtriage.store.state import MILTER_INTAKE

        def record(key: str, decision: Decision, version: str, explanation: Explanation | None = None,
                   envelope: Envelope | None = None) -> None:
            state.record_relayed(key, decision, version, intake=MILTER_INTAKE, explanation=explanation,
                                 envelope=envelope)

    server = MilterServer(service.config, service.classify_async, record=record)
    await server.start()
    return server.close

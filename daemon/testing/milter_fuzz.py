"""Seeded fuzzing of the milter (the CI slice: tests/test_milter_fuzz.py; the long run:
``python -m benchmarks.fuzz_milter``): same seed, same inputs.

``fuzz_milter`` drives a real ``MilterServer`` (keyword fake model) over TCP with hostile packet
streams - garbage, truncated packets, zero and oversized lengths, unknown codes, commands before
or instead of OPTNEG, bad offers, malformed payloads, header floods, bodies past the limit - and
with whole hostile messages (``smtp_fuzz.forged_mail``: forged X-Mailtriage-* fields, smuggling line
endings) sent the way Postfix sends them. A finding: a reply that is not a well-formed filter
reply, a connection that neither answers nor closes, a handler error, a message that leaves with
another X-Mailtriage-* field than ours, or more held than the limit. Never raises on a finding.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mailtriage.milter import protocol as p
from mailtriage.testing.milter import POSTFIX_ACTIONS, POSTFIX_STEPS, MilterClient, split_message
from mailtriage.testing.smtp_fuzz import forged_mail

MAX_MESSAGE = 256 * 1024  # the fuzzed server's [milter] max_message_size
_OFFER = p.optneg(p.OptNeg(6, POSTFIX_ACTIONS, POSTFIX_STEPS))


def _pkt(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload) + 1) + code + payload


def _random_command(rng: random.Random) -> bytes:
    """One packet, valid or broken in one way."""
    kind = rng.randrange(12)
    if kind == 0:
        name = rng.choice([b"Subject", b"X-Mailtriage-Category", b"x-MAILTRIAGE-confidence", b"From", b"X-Mailtriage-"
                           + bytes(rng.randrange(33, 127) for _ in range(rng.randint(1, 20)))])
        return _pkt(b"L", name + b"\0" + rng.randbytes(rng.randint(0, 300)).replace(b"\0", b"") + b"\0")
    if kind == 1:
        return _pkt(b"L", rng.randbytes(rng.randint(0, 40)))  # NULs wherever they fall
    if kind == 2:
        return _pkt(b"B", rng.randbytes(rng.randint(0, 70_000)))
    if kind == 3:
        return _pkt(b"D", rng.choice([b"", b"C", b"Mi\0x\0", b"Mdangling"]))
    if kind == 4:
        return _pkt(bytes([rng.randrange(256)]), rng.randbytes(rng.randint(0, 30)))  # any code
    if kind == 5:
        return _pkt(rng.choice([b"A", b"N", b"T", b"K"]), rng.choice([b"", b"x"]))
    if kind == 6:
        return _pkt(b"C", rng.choice([b"h\0" + b"4" + b"\x00\x19" + b"1.2.3.4\0", b"h\0U", b"h\0Z", b"h", b""]))
    if kind == 7:
        return _pkt(b"E", rng.randbytes(rng.randint(0, 100)))
    if kind == 8:
        return _OFFER  # a second OPTNEG
    if kind == 9:
        return _pkt(b"M", rng.choice([b"<a@b>\0", b"<a@b>", b""]))
    if kind == 10:
        return struct.pack("!I", rng.choice([0, p.MAX_PACKET + 1, 0xFFFFFFFF, rng.randrange(1 << 32)]))
    return rng.randbytes(rng.randint(1, 64))  # garbage, framing and all


def hostile_stream(seed: int, index: int) -> bytes:
    """Input ``index`` for ``seed``: bytes an MTA (or anything) might write to the milter port."""
    rng = random.Random(seed * 1_000_037 + index)
    case = rng.randrange(8)
    if case == 0:
        return rng.randbytes(rng.randint(0, 3000))
    if case == 1:  # something other than OPTNEG first
        return _random_command(rng) + _OFFER
    if case == 2:  # a bad offer
        return rng.choice([
            _pkt(b"O", b"\0\0\0\x06"), _pkt(b"O", struct.pack("!III", 1, POSTFIX_ACTIONS, 0)),
            _pkt(b"O", struct.pack("!III", 6, p.SMFIF_ADDHDRS, POSTFIX_STEPS)), _pkt(b"O", rng.randbytes(12)),
            _pkt(b"O", struct.pack("!III", 6, 0, 0) + rng.randbytes(50)),
        ])
    stream = _OFFER + b"".join(_random_command(rng) for _ in range(rng.randint(1, 12)))
    if case == 3:  # cut anywhere
        return stream[:rng.randint(0, len(stream))]
    if case == 4:  # a header flood past the limit, then end of message
        n = rng.randint(50, 400)
        return _OFFER + b"".join(_pkt(b"L", b"X-Flood-%d\0" % i + b"v" * 2000 + b"\0") for i in range(n)) + _pkt(b"E")
    if case == 5:  # a body far past the limit, then end of message
        return _OFFER + _pkt(b"L", b"Subject\0invoice\0") + _pkt(b"B", b"x" * 65535) * rng.randint(4, 12) + _pkt(b"E")
    return stream


@dataclass
class FuzzReport:
    inputs: int = 0
    failures: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def fail(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(what)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


def _send_stream(port: int, data: bytes, deadline_s: float) -> tuple[list[tuple[bytes, bytes]], str]:
    """Write ``data``, half-close, read replies until the filter closes: (replies, problem or "")."""
    client = MilterClient("127.0.0.1", port, timeout=deadline_s)
    try:
        try:
            client.send(data)
            client.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed on us mid-write: allowed
        try:
            return client.read_until_closed(deadline_s), ""
        except TimeoutError as exc:
            return [], str(exc)
        except p.ProtocolError as exc:
            return [], f"unframed reply: {exc}"
    finally:
        client.close()


def fuzz_milter(port: int, n: int, seed: int = 1, deadline_s: float = 15.0) -> FuzzReport:
    """``n`` inputs against the milter on ``port``: every third a whole hostile message sent as
    Postfix would, the rest raw hostile streams."""
    report = FuzzReport()
    for i in range(n):
        report.inputs += 1
        if i % 3 == 2:
            _fuzz_message(port, seed, i, report)
            continue
        replies, problem = _send_stream(port, hostile_stream(seed, i), deadline_s)
        if problem:
            report.fail(f"stream {seed}/{i}: {problem}")
            continue
        report.count("closed_after_replies" if replies else "closed_silently")
        for code, payload in replies:
            try:
                p.parse_response(code, payload)
            except p.ProtocolError as exc:
                report.fail(f"stream {seed}/{i}: malformed reply {code!r}: {exc}")
            report.count(f"reply_{code.decode('latin-1')}")
    return report


def _fuzz_message(port: int, seed: int, index: int, report: FuzzReport) -> None:
    raw = forged_mail(seed, index)
    try:
        with MilterClient("127.0.0.1", port, timeout=30) as client:
            client.negotiate()
            result = client.message(raw)
            client.quit()
    except Exception as exc:  # noqa: BLE001 - a finding, not a crash of the run
        report.fail(f"message {seed}/{index}: {type(exc).__name__}: {exc}")
        return
    if not result.accepted:
        report.fail(f"message {seed}/{index}: not accepted: {result.smtp_reply}")
        return
    ours = [n.lower() for n, _ in split_message(result.apply(raw))[0] if n.lower().startswith(b"x-mailtriage-")]
    if sorted(ours) != [b"x-mailtriage-category", b"x-mailtriage-confidence"]:
        report.fail(f"message {seed}/{index}: X-Mailtriage-* fields after tagging: {ours}")
    report.count("messages_tagged")


@dataclass
class MilterUnderTest:
    port: int
    server: Any


def milter_under_test() -> Iterator[MilterUnderTest]:
    """Generator (contextlib.contextmanager or a pytest fixture): a MilterServer with the keyword
    fake model on its own loop thread, max_message_size = MAX_MESSAGE, short idle timeout."""
    from mailtriage.config import Config, MilterConfig, ModelConfig
    from mailtriage.milter.server import MilterServer
    from mailtriage.testing.fakes import KeywordClassifier

    categories = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
    config = Config(categories=categories, model=ModelConfig(threshold=0.6, device="cpu"),
                    milter=MilterConfig(enabled=True, max_message_size=MAX_MESSAGE, idle_timeout=10))
    classifier = KeywordClassifier(tuple(categories), {"invoice": "billing"})

    async def classify(texts: Any) -> Any:
        return classifier(texts)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-milter", daemon=True)
    thread.start()
    server = MilterServer(config, classify, host="127.0.0.1", port=0)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    try:
        yield MilterUnderTest(server.port, server)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(grace=1), loop).result(30)
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def wait_idle(server: Any, deadline_s: float = 10.0) -> None:
    """Wait until the server holds no connection (each handler has recorded its bookkeeping)."""
    end = time.monotonic() + deadline_s
    while server._connections and time.monotonic() < end:  # noqa: SLF001 - test harness
        time.sleep(0.02)

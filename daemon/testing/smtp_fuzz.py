"""Seeded fuzzing of the SMTP front and the header tagging.

One generator for the fast subset in the suite (tests/test_smtp_fuzz.py) and the long run
(``python -m benchmarks.fuzz_smtp``, >= 100,000 inputs): same seed, same inputs. ``fuzz_smtp``
drives a real relay (aiosmtpd front, our content filter, the keyword fake model) over a real
socket with random command lines and hostile messages (``mailtriage.testing.fuzz`` plus forged
X-Mailtriage-* fields and smuggling line endings), with a real aiosmtpd next hop behind it;
``fuzz_tagging`` puts the same messages through ``add_headers``. Each returns counts and the first
failures found and never raises on a finding, so a long run reports everything it saw.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mailtriage.core.routing import Decision
from mailtriage.core.tagging import add_headers, header_fingerprint, split_header
from mailtriage.testing.fuzz import hostile_message
from mailtriage.testing.imapserver import free_port

_BARE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_DECISION = Decision("billing", 0.9, False, "Support/Billing")

# Spliced into the hostile messages: forgeries and line endings the tagging must see through.
_FORGERY = [
    b"X-Mailtriage-Category: refunds", b"x-mailtriage-confidence: 1.0", b"X-MAILTRIAGE-Category : unsure",
    b" folded", b"\tfolded", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b"\r\r\n", b".", b"\r.\r\n",
    b"\n.\r\n", b"MAIL FROM:<evil@example.com>", b"\x00", b"\xff",
    b"X-Mailtriage-Category\x00: refunds", b"\x00X-Mailtriage-Category: refunds", b"X-Mailtriage-Category\x7f: x",
    b"X-Mailtriage-Category\x0b\x00 : refunds", b"X-Mailtriage-Category\xa0: refunds",
]


def forged_mail(seed: int, index: int) -> bytes:
    """Input ``index`` for ``seed``: a hostile message with forgeries spliced in (replayable)."""
    rng = random.Random(seed * 1_000_033 + index)
    raw = hostile_message(seed, index)
    if rng.random() < 0.3:
        raw = b" " + raw  # a first line that starts with whitespace
    for _ in range(rng.randint(0, 6)):
        at = rng.randint(0, min(len(raw), 2000))  # mostly in the header block
        raw = raw[:at] + b"".join(rng.choice(_FORGERY) for _ in range(rng.randint(1, 3))) + raw[at:]
    return raw


@dataclass
class FuzzReport:
    inputs: int = 0
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def fail(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what)
        self.counts["failures"] = self.counts.get("failures", 0) + 1

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


def fuzz_tagging(n: int, seed: int = 0) -> FuzzReport:
    """``n`` forged hostile messages through ``add_headers``: CRLF only, our two fields on top and
    the only X-Mailtriage-* fields any parser finds, the fingerprint unchanged."""
    report = FuzzReport()
    for i in range(n):
        raw = forged_mail(seed, i)
        started = time.perf_counter()
        report.inputs += 1
        try:
            tagged = add_headers(raw, _DECISION)
        except Exception as exc:  # noqa: BLE001 - a finding, reported with its input number
            report.fail(f"input {i} (seed {seed}): {type(exc).__name__}: {exc}")
            continue
        finally:
            report.slowest_s = max(report.slowest_s, time.perf_counter() - started)
        for problem in tagged_problems(tagged):
            report.fail(f"input {i} (seed {seed}): {problem}")
        if header_fingerprint(tagged) != header_fingerprint(raw):
            report.fail(f"input {i} (seed {seed}): the tagged copy's fingerprint differs from the original's")
    return report


def tagged_problems(tagged: bytes) -> list[str]:
    problems = []
    if _BARE_EOL.search(tagged):
        problems.append("bare CR or LF in the tagged message")
    if not tagged.startswith(b"X-Mailtriage-Category: "):
        problems.append("our header is not on top")
    header, _rest = split_header(tagged)
    # The stdlib's parser splits lines like Postfix's cleanup (CR, LF and CRLF are all line ends);
    # compat32 keeps header values as they are, so only the field names are compared.
    msg = email.message_from_bytes(header + b"\r\n\r\n", policy=email.policy.compat32)
    fields = [k for k in msg.keys() if k.lower().startswith("x-mailtriage-")]
    if sorted(f.lower() for f in fields) != ["x-mailtriage-category", "x-mailtriage-confidence"]:
        problems.append(f"X-Mailtriage-* fields {fields}")
    return problems + category_readings(tagged)


# -- header names with every byte ----------------------------------------------------------------

_NAME = b"X-Mailtriage-Category"
# Where a byte goes into the forged name: before it, inside the prefix, inside the rest, just before
# the colon, in place of a hyphen, after the colon.
_NAME_SPOTS = (0, 2, 6, 14, len(_NAME))


def forged_names() -> Iterator[tuple[str, bytes]]:
    """(label, header line) for every byte 0-255 at every spot of a forged category field's name."""
    for byte in range(256):
        b = bytes([byte])
        for at in _NAME_SPOTS:
            yield f"byte {byte:#04x} at {at}", _NAME[:at] + b + _NAME[at:] + b": refunds"
        yield f"byte {byte:#04x} for '-'", _NAME.replace(b"-", b, 1) + b": refunds"
        yield f"byte {byte:#04x} doubled before ':'", _NAME + b + b + b": refunds"
        yield f"byte {byte:#04x} after ':'", _NAME + b":" + b + b"refunds"


def naive_fields(header: bytes, drop: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) as a reader that takes the name up to the colon with the ``drop`` bytes removed
    and blanks around it trimmed (Dovecot's reading drops NUL), with folded lines unfolded."""
    fields: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        elif b":" in line:
            name, value = line.split(b":", 1)
            fields.append((name.translate(None, drop).strip(b" \t"), value.strip()))
    return fields


def category_readings(tagged: bytes) -> list[str]:
    """What is wrong with a tagged message's X-Mailtriage-Category as each kind of reader sees it:
    each must find exactly one, the one on the first line (ours)."""
    problems = []
    header, _rest = split_header(tagged)
    ours = header.split(b"\r\n", 1)[0].partition(b": ")[2]
    for policy in (email.policy.compat32, email.policy.default):
        try:
            msg = email.message_from_bytes(header + b"\r\n\r\n", policy=policy)
            found = [str(v) for v in (msg.get_all(_NAME.decode()) or [])]
        except RecursionError:  # the stdlib's modern header parser on some hostile values
            continue
        if found != [ours.decode("ascii", "replace")]:
            problems.append(f"email parser ({type(policy).__name__}) reads categories {found}")
    controls = bytes(range(0x20)) + b"\x7f"
    for label, drop in (("NUL dropped", b"\x00"), ("controls dropped", controls)):
        found_b = [v for n, v in naive_fields(header, drop) if n.lower() == _NAME.lower()]
        if found_b != [ours]:
            problems.append(f"name up to ':' ({label}) reads categories {found_b}")
    return problems


def fuzz_header_names() -> FuzzReport:
    """Every byte 0-255 in every spot of a forged X-Mailtriage-Category name, through ``add_headers``:
    no reader may find a category but ours."""
    report = FuzzReport()
    for label, line in forged_names():
        report.inputs += 1
        raw = b"From: a@example.com\r\n" + line + b"\r\nSubject: s\r\n\r\nbody\r\n"
        for first in (False, True):  # in the middle of the header block, and as its very first line
            msg = line + b"\r\n" + raw if first else raw
            for problem in category_readings(add_headers(msg, _DECISION)):
                report.fail(f"{label}{' (first line)' if first else ''}: {problem}")
    return report


# -- the SMTP front ----------------------------------------------------------------------------

_VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP",
          b"STARTTLS", b"AUTH", b"BDAT", b"QUIT", b"ehlo", b"mail from:", b"XCLIENT", b""]
_ADDRS = [b"<support@example.com>", b"<>", b"<", b">", b"<a\x00b@x>", b"<\xff@x>", b"<kund\xc3\xa9@x>",
          b"support@example.com", b"<a@b> SIZE=100", b"<a@b> BODY=8BITMIME", b"<a@b> SMTPUTF8", b"<a@b> FOO=bar",
          b"<@route:a@b>", b"<\"quoted local\"@x>", b"<a@[127.0.0.1]>", b"<" + b"x" * 600 + b"@y>", b"<a@b> SIZE=-1"]


def _command(rng: random.Random) -> bytes:
    verb = rng.choice(_VERBS)
    r = rng.random()
    if r < 0.5 and verb in (b"MAIL FROM:", b"RCPT TO:", b"mail from:"):
        arg = rng.choice(_ADDRS)
    elif r < 0.7:
        arg = b" " + rng.choice([b"client.test", b"", b"x" * rng.randint(0, 2000), b"\xff\xfe", b"LOGIN", b"PLAIN AGFiYwBkZWY="])
    else:
        arg = rng.randbytes(rng.randint(0, 60))
    line = verb + arg
    return line.replace(b"\n", b" ")  # a bare LF would split the line into two commands: one reply each


def _stuffed(body: bytes) -> bytes:
    # What a correct client sends: dot-stuffing after every CRLF, a CRLF before the final dot.
    body = re.sub(rb"(^|\r\n)\.", rb"\1..", body)
    return body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n"


class _Session:
    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.reader.readline()
            if not line:
                return lines
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


_REPLY = re.compile(rb"^[2345][0-9][0-9]([ -]|\r\n)")


def fuzz_smtp(port: int, n: int, seed: int = 0, *, data_share: float = 0.04, timeout: float = 30.0) -> FuzzReport:
    """``n`` inputs (command lines and messages) to the SMTP front on ``port``; checks every reply.

    Counts ``delivered`` (messages the front answered 250 after DATA) for the caller to compare
    with what the next hop received.
    """
    rng = random.Random(seed)
    report = FuzzReport()
    session: _Session | None = None
    try:
        while report.inputs < n:
            if session is None:
                session = _Session(port, timeout)
                banner = session.reply()
                if not banner or not banner[-1].startswith(b"220"):
                    report.fail(f"banner {banner!r}")
                    session.close()
                    session = None
                    time.sleep(0.1)
                    continue
            if rng.random() < data_share:
                line_sets = [b"EHLO fuzz.test", b"MAIL FROM:<customer@example.com>", b"RCPT TO:<support@example.com>",
                             b"DATA"]
            else:
                line_sets = [_command(rng)]
            closed = False
            for line in line_sets:
                report.inputs += 1
                try:
                    session.sock.sendall(line + b"\r\n")
                    reply = session.reply()
                except OSError as exc:
                    report.fail(f"input {report.inputs}: {line[:60]!r}: {type(exc).__name__}: {exc}")
                    closed = True
                    break
                if not reply:
                    if not line.upper().startswith(b"QUIT"):
                        report.fail(f"input {report.inputs}: {line[:60]!r}: connection closed without a reply")
                    closed = True
                    break
                code = reply[-1][:3]
                if not all(_REPLY.match(r) for r in reply):
                    report.fail(f"input {report.inputs}: malformed reply {reply!r}")
                if b"Error: (" in reply[-1]:  # aiosmtpd's text for an exception nobody handled
                    report.fail(f"input {report.inputs}: {line[:60]!r}: unhandled error {reply[-1]!r}")
                report.count(f"reply_{code.decode('ascii', 'replace')}")
                if code in (b"221", b"421") or reply[-1].startswith(b"502 5.5.1 Too many unrecognized commands"):
                    closed = True  # QUIT, a limit, or aiosmtpd's five-bogus-commands rule: it hangs up
                    break
                if code == b"354":
                    report.inputs += 1
                    body = forged_mail(seed, report.inputs)
                    try:
                        session.sock.sendall(_stuffed(body))
                        final = session.reply()
                    except OSError as exc:
                        report.fail(f"input {report.inputs}: message: {type(exc).__name__}: {exc}")
                        closed = True
                        break
                    if not final or not _REPLY.match(final[-1]):
                        report.fail(f"input {report.inputs}: message answered {final!r}")
                        closed = True
                        break
                    fcode = final[-1][:3]
                    report.count(f"data_{fcode.decode('ascii', 'replace')}")
                    if fcode == b"250":
                        report.count("delivered")
                    elif fcode[:1] != b"5" and fcode[:1] != b"4":
                        report.fail(f"input {report.inputs}: message answered {final!r}")
            if closed:
                session.close()
                session = None
    finally:
        if session is not None:
            session.close()
    return report


# -- a relay with a next hop, for the fuzz run ----------------------------------------------------


@dataclass
class RelayUnderTest:
    port: int
    received: list[Any]
    errors: list[dict[str, Any]]


def relay_with_next_hop() -> Iterator[RelayUnderTest]:
    """Generator (use with contextlib.contextmanager or as a pytest fixture): a relay with the
    keyword fake model on its own event loop thread, a real aiosmtpd next hop behind it; yields
    the relay's port, what the next hop received and the relay's error log events."""
    import structlog
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    from mailtriage.config import Config, ModelConfig, SmtpConfig
    from mailtriage.smtp.nexthop import NextHop
    from mailtriage.smtp.relay import SmtpFilter
    from mailtriage.testing.fakes import KeywordClassifier

    class Hop:
        def __init__(self) -> None:
            self.received: list[Any] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.received.append(envelope)
            return "250 2.0.0 Ok: queued"

    class LongLineSMTP(SMTP):
        line_length_limit = 8 << 20  # like Postfix's smtpd, which takes lines of any length

    class HopController(Controller):
        def factory(self) -> SMTP:
            return LongLineSMTP(self.handler, **self.SMTP_kwargs)

    hop = Hop()
    hop_port = free_port()
    controller = HopController(hop, hostname="127.0.0.1", port=hop_port, server_hostname="nexthop.fuzz")
    controller.start()
    categories = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
    config = Config(categories=categories, model=ModelConfig(threshold=0.6, device="cpu"),
                    smtp=SmtpConfig(enabled=True, listen_host="127.0.0.1"))
    classifier = KeywordClassifier(tuple(categories))

    async def classify(texts: Any) -> Any:
        return classifier(texts)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-relay", daemon=True)
    thread.start()
    server = SmtpFilter(config, classify, port=0, hostname="relay.fuzz", data_size_limit=4 * 1024 * 1024,
                        next_hop=NextHop("127.0.0.1", hop_port, timeout=30, local_hostname="relay.fuzz"))
    errors: list[dict[str, Any]] = []

    def keep_errors(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if method in ("error", "critical", "exception") or event.get("exc_info"):
            errors.append(dict(event))
        raise structlog.DropEvent

    old = structlog.get_config()
    structlog.configure(processors=[keep_errors])
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    try:
        yield RelayUnderTest(server.port, hop.received, errors)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(grace=5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        controller.stop()
        structlog.configure(**old)


def check_relayed(received: list[Any]) -> list[str]:
    """What every relayed message must look like at the next hop: CRLF only, our two fields the only ones."""
    problems = []
    for n, env in enumerate(received):
        content = env.content if isinstance(env.content, bytes) else str(env.content).encode("utf-8", "surrogateescape")
        problems += [f"message {n}: {p}" for p in tagged_problems(content)]
    return problems

"""Hostile senders against the SMTP content filter over real sockets:
forged X-Mailtriage-* headers behind odd line endings, SMTP smuggling with bare CR/LF, long lines.

Real aiosmtpd front (the relay) and a real aiosmtpd next hop started per test; the client is
smtplib or a raw socket where smtplib would clean up what we mean to send.
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib

from collections.abc import Iterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from mailtriage.testing.builders import mail
from mailtriage.testing.smtp_fuzz import category_readings
from tests.test_relay import (  # noqa: F401 - next_hop and start_relay are fixtures
    NextHopHandler,
    StartRelay,
    free_port,
    keyword_classify,
    next_hop,
    send,
    start_relay,
)

pytestmark = pytest.mark.component

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def send_raw_data(port: int, data: bytes) -> list[bytes]:
    """One transaction whose DATA bytes go on the wire exactly as given (smtplib would dot-stuff
    after a bare LF); returns the replies."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")
        replies = [reader.readline()]
        sock.sendall(b"EHLO client.test\r\n")
        while (line := reader.readline())[3:4] == b"-":
            pass
        for command in (b"MAIL FROM:<customer@example.com>", b"RCPT TO:<support@example.com>", b"DATA"):
            sock.sendall(command + b"\r\n")
            replies.append(reader.readline())
        sock.sendall(data + b"\r\n.\r\n")
        replies.append(reader.readline())
        sock.sendall(b"QUIT\r\n")
        reader.readline()
    return replies


def relayed(hop: NextHopHandler) -> bytes:
    [env] = hop.received
    assert isinstance(env.content, bytes)
    return env.content


FORGED = {
    "bare-lf": b"From: a@example.com\r\nSubject: invoice\nX-Mailtriage-Category: refunds\r\n",
    "bare-cr": b"From: a@example.com\r\nSubject: invoice\rX-Mailtriage-Category: refunds\r\n",
    "bare-cr-folded": b"From: a@example.com\r\nSubject: invoice\rX-Mailtriage-Category: refunds\r\n\tmore\r\n",
    "leading-whitespace": b" refunds\r\nFrom: a@example.com\r\nSubject: invoice\r\n",
    "one-header": b"Subject: invoice\r\n",
    # Dovecot drops the NUL and reads a second category; Python's parser ends the header there.
    "nul-in-name": b"From: a@example.com\r\nX-Mailtriage-Category\x00: refunds\r\nSubject: invoice\r\n",
    "nul-first": b"\x00X-Mailtriage-Category: refunds\r\nFrom: a@example.com\r\nSubject: invoice\r\n",
    "control-blank": b"From: a@example.com\r\nX-Mailtriage-Category\x0b : refunds\r\nSubject: invoice\r\n",
}


@pytest.mark.parametrize("header", list(FORGED.values()), ids=list(FORGED))
def test_forged_headers_do_not_survive_odd_line_endings(
    header: bytes, next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    assert send(port, header + b"\r\nplease send the invoice\r\n") == {}
    content = relayed(hop)
    # Before the fix: the forged field survived behind the bare LF/CR (Postfix and Python's email
    # read a line break there), the leading-whitespace line folded into our Confidence header, and
    # a one-header message got our two headers with bare LF endings.
    assert not BARE.search(content), content[:200]
    for policy in (email.policy.compat32, email.policy.default):
        msg = email.message_from_bytes(content, policy=policy)
        assert msg.get_all("X-Mailtriage-Category") == ["billing"]
        assert msg.get_all("X-Mailtriage-Confidence") == ["0.9500"]
    assert content.startswith(b"X-Mailtriage-Category: billing\r\nX-Mailtriage-Confidence: 0.9500\r\n")
    assert b"refunds" not in content
    assert category_readings(content) == []  # also as read up to the colon with NULs or controls dropped
    assert content.endswith(b"\r\n\r\nplease send the invoice\r\n")


@pytest.mark.parametrize("eol", [b"\r", b"\n"], ids=["bare-cr", "bare-lf"])
def test_smuggled_end_of_data_is_stuffed_and_relayed_as_text(
    eol: bytes, next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    smuggled = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nX-Mailtriage-Category: refunds\r\n"
    raw = mail("about my invoice") + b"tail" + eol + b"." + b"\r\n" + smuggled
    replies = send_raw_data(port, raw)
    assert replies[-1].startswith(b"250 "), replies
    content = relayed(hop)
    # Before the fix "tail\r.\r\n" went to the next hop as it came: no dot-stuffing after a bare
    # CR, so a next hop that ends lines at a bare CR ended DATA there and ran the rest as commands.
    # Normalised, the dot line is stuffed on the wire and arrives as one line of text.
    assert not BARE.search(content)
    assert b"tail\r\n.\r\nMAIL FROM:<evil@example.com>\r\n" in content
    assert len(hop.received) == 1 and hop.received[0].rcpt_tos == ["support@example.com"]
    assert content.count(b"X-Mailtriage-Category: ") == 2  # ours on top; the smuggled one is body text
    assert email.message_from_bytes(content).get_all("X-Mailtriage-Category") == ["billing"]


class _LongLineSMTP(SMTP):
    line_length_limit = 1 << 20  # like Postfix's smtpd, which takes lines of any length


class _LongLineController(Controller):
    def factory(self) -> SMTP:
        return _LongLineSMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def long_line_next_hop() -> Iterator[tuple[NextHopHandler, int]]:
    handler = NextHopHandler()
    port = free_port()
    controller = _LongLineController(handler, hostname="127.0.0.1", port=port, server_hostname="nexthop.test")
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def test_long_lines_are_accepted_and_relayed_whole(
    long_line_next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    # RFC 5321 §4.5.3.1.6 caps a line at 1,000 octets but §4.5.3.1 asks receivers to impose no
    # limit where they can; aiosmtpd answered a permanent "500 Line too long" (the sender bounces
    # the mail). mailtriage accepts such lines and relays them unchanged.
    hop, hop_port = long_line_next_hop
    port = start_relay(keyword_classify, hop_port)
    long_line = b"invoice " + b"x" * 5000
    long_header = b"X-Long: " + b"y" * 3000 + b"\r\n"
    raw = long_header + mail("see below") + long_line + b"\r\n" + b"z" * 200_000 + b"\r\n"
    assert send(port, raw) == {}
    content = relayed(hop)
    assert long_line + b"\r\n" + b"z" * 200_000 + b"\r\n" in content
    assert long_header in content
    # The limit is the message size: one line longer than all of it still cannot fit.
    with smtplib.SMTP("127.0.0.1", start_relay(keyword_classify, hop_port, data_size_limit=10_000)) as client:
        client.ehlo()
        assert client.mail("customer@example.com")[0] == 250  # no SIZE=: found while reading DATA
        assert client.rcpt("support@example.com")[0] == 250
        code, _ = client.data(mail("x") + b"y" * 20_000 + b"\r\n")
        assert 500 <= code < 600
        assert client.noop()[0] == 250  # and the session is still in step
    assert len(hop.received) == 1


def test_long_command_lines_still_get_500(next_hop: tuple[NextHopHandler, int], start_relay: StartRelay) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        code, _ = client.docmd("NOOP", "x" * 5000)
        assert code == 500  # a command is not mail text: RFC 5321 §4.5.3.1.4 (512) stands
        assert client.noop()[0] == 250
    assert hop.received == []


# -- found by the SMTP fuzzer (daemon/testing/smtp_fuzz.py) ------------------------------------


def _session(port: int, commands: list[bytes]) -> list[bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")
        replies = [reader.readline()]
        for command in commands:
            sock.sendall(command + b"\r\n")
            while (line := reader.readline())[3:4] == b"-":
                pass
            replies.append(line)
    return replies


def test_echoed_bytes_that_are_not_utf8_or_hold_a_cr_get_a_clean_reply(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    import structlog

    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    with structlog.testing.capture_logs() as logs:
        replies = _session(port, [b"EHLO fuzz.test", b"VRFY \xff\xfe", b"VRFY a\rRCPT TO:<x@y>", b"NOOP"])
    # Before: aiosmtpd's reply "502 Could not VRFY <the bytes>" failed to encode -> a 451 and a
    # logged traceback per command; a CR was echoed into the reply line.
    assert not [e for e in logs if e["event"] == "smtp_handler_error"]
    vrfy, vrfy_cr, noop = replies[2:]
    assert vrfy[:1] in (b"2", b"5") and not vrfy.startswith(b"451"), vrfy
    assert vrfy_cr.count(b"\r") == 1 and vrfy_cr.endswith(b"\r\n"), vrfy_cr
    assert noop.startswith(b"250")


def test_non_ascii_address_without_smtputf8_is_a_permanent_553(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    replies = _session(port, [b"EHLO fuzz.test", "MAIL FROM:<kundé@example.com>".encode(),
                              b"MAIL FROM:<ok@example.com>", "RCPT TO:<støtte@example.com>".encode()])
    # Before: 250 here, then smtplib could not send it on: a 451 on every retry, forever.
    assert replies[2].startswith(b"553 5.6.7"), replies
    assert replies[3].startswith(b"250")
    assert replies[4].startswith(b"553 5.6.7"), replies
    assert hop.received == []


def test_bogus_commands_do_not_flood_the_log(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import structlog

    hop, hop_port = next_hop
    logging.getLogger("mail.log").setLevel(logging.NOTSET)  # as a fresh process has it
    port = start_relay(keyword_classify, hop_port)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        for _ in range(6):  # aiosmtpd hangs up after five bogus commands; the client comes back
            replies = _session(port, [b"XYZZY %d" % n for n in range(5)])
            assert replies[-1].startswith(b"502 5.5.1")
    # Before: one WARNING line per bogus command from aiosmtpd's logger (36 here), unbounded.
    assert [r for r in caplog.records if r.name == "mail.log" and r.levelno >= logging.WARNING] == []
    assert [e for e in logs if e.get("log_level") in ("warning", "error")] == []


def test_a_handler_error_any_client_can_trigger_is_not_a_traceback_per_command(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    import structlog

    from mailtriage.smtp import nexthop

    def boom(self: object, recipient: str) -> None:
        raise RuntimeError("a bug")

    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    monkeypatch.setattr(nexthop.NextHopTransaction, "rcpt", boom)
    with structlog.testing.capture_logs() as logs:
        replies = _session(port, [b"EHLO x.test", b"MAIL FROM:<a@example.com>"]
                           + [b"RCPT TO:<r%d@example.com>" % n for n in range(30)])
    assert all(r.startswith(b"451") for r in replies[3:]), replies  # still a 451 each
    # Before: 30 error lines, each with its traceback. Now one per 10 s (none if an earlier test
    # logged one within the last 10 s).
    assert len([e for e in logs if e["event"] == "smtp_handler_error"]) <= 1

"""A CI-sized slice of the milter fuzz (the long run: ``python -m benchmarks.fuzz_milter``).

A real milter on a real socket gets hostile packet streams and forged messages: every reply must be
a well-formed filter reply, every connection must be answered or closed (never left hanging), no
handler error may occur, tagged mail leaves with our two X-Mailtriage-* fields only, and no message
ever holds more than the limit. Afterwards the milter still tags an ordinary message.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import pytest

from mailtriage.milter import protocol as p
from mailtriage.testing.milter import MilterClient, tag_once
from mailtriage.testing.milter_fuzz import MAX_MESSAGE, fuzz_milter, hostile_stream, milter_under_test, wait_idle

OK_MAIL = b"From: a@example.com\r\nSubject: invoice\r\n\r\nmy invoice please\r\n"


@pytest.mark.pure
def test_streams_are_replayable() -> None:
    assert hostile_stream(3, 9) == hostile_stream(3, 9)
    assert len({hostile_stream(3, i) for i in range(60)}) > 50


@pytest.mark.component
def test_milter_survives_300_hostile_inputs() -> None:
    with contextlib.contextmanager(milter_under_test)() as milter:
        report = fuzz_milter(milter.port, 300, seed=20261204)
        wait_idle(milter.server)
        assert report.failures == []
        assert milter.server.errors == 0  # no unexpected exception in any connection
        assert report.counts.get("messages_tagged", 0) >= 90
        assert report.counts.get("closed_silently", 0) > 0  # broken streams were cut off
        assert 0 < milter.server.peak_held <= MAX_MESSAGE
        assert tag_once("127.0.0.1", milter.port, OK_MAIL).added()["X-Mailtriage-Category"] == "billing"


@pytest.mark.component
@pytest.mark.parametrize(
    ("name", "stream", "hang_up"),
    [
        ("length 0", b"\x00\x00\x00\x00", False),
        ("length 4 GiB", b"\xff\xff\xff\xff" + b"x" * 100, False),
        ("header before OPTNEG", struct.pack("!I", 5) + b"LA\0b\0", False),
        ("unknown command", p.optneg(p.OptNeg(6, 0x1FF, 0x1FFFFF)) + b"\x00\x00\x00\x01Z", False),
        ("command with a malformed payload", p.optneg(p.OptNeg(6, 0x1FF, 0x1FFFFF)) + b"\x00\x00\x00\x03LA\0", False),
        ("version 1", p.optneg(p.OptNeg(1, 0x1FF, 0)), False),
        ("no header actions", p.optneg(p.OptNeg(6, p.SMFIF_CHGBODY, 0)), False),
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
        # A cut packet is only known as cut when the peer hangs up (or at the idle timeout, below).
        ("truncated length", b"\x00\x00", True),
        ("truncated OPTNEG", b"\x00\x00\x00\x0dO\x00\x00\x00\x06", True),
        ("hang-up mid-message", p.optneg(p.OptNeg(6, 0x1FF, 0x1FFFFF)) + p.command(p.SMFIC_HEADER, b"A", b"b"), True),
    ],
)
def test_hostile_packets_close_the_connection_without_a_reply_and_the_milter_stays_up(
    name: str, stream: bytes, hang_up: bool
) -> None:
    with contextlib.contextmanager(milter_under_test)() as milter:
        with MilterClient("127.0.0.1", milter.port, timeout=10) as client:
            client.send(stream)  # without a hang-up the milter must close on its own, not wait for more
            if hang_up:
                client.sock.shutdown(socket.SHUT_WR)
            replies = client.read_until_closed(10)
        assert [code for code, _ in replies] in ([], [p.SMFIC_OPTNEG])  # at most the answer to a good OPTNEG
        wait_idle(milter.server)
        assert milter.server.errors == 0
        assert tag_once("127.0.0.1", milter.port, OK_MAIL).accepted


@pytest.mark.component
def test_a_packet_announcing_more_than_it_sends_is_dropped_at_the_idle_timeout() -> None:
    with contextlib.contextmanager(milter_under_test)() as milter:
        milter.server.idle_timeout = 0.5
        started = time.monotonic()
        with MilterClient("127.0.0.1", milter.port, timeout=10) as client:
            client.send(p.optneg(p.OptNeg(6, 0x1FF, 0x1FFFFF)) + struct.pack("!I", 60_000) + b"L")
            replies = client.read_until_closed(10)
        assert [code for code, _ in replies] == [p.SMFIC_OPTNEG]
        assert time.monotonic() - started < 10  # closed by the milter, not by our deadline

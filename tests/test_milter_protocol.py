"""The milter codec and the per-connection session, table-style, without sockets.

Packets are written out byte by byte here (not built with the module under test), so a codec bug
cannot hide behind the same bug in the builder.
"""

from __future__ import annotations

import struct

import pytest

from mailtriage.core.routing import Decision
from mailtriage.milter import protocol as p
from mailtriage.milter.session import TEMPFAIL_TEXT, Classify, Close, MilterSession, Send
from mailtriage.testing.milter import POSTFIX_ACTIONS, POSTFIX_STEPS, MilterResult, split_message

pytestmark = pytest.mark.pure

DECISION = Decision("billing", 0.9123, False, "Support/Billing")


def pkt(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload) + 1) + code + payload


# -- framing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        (b"\x00\x00\x00\x01", 1),
        (b"\x00\x01\x00\x00", 65536),
        (b"\x00\x10\x00\x00", p.MAX_PACKET),
    ],
)
def test_packet_length_accepts(word: bytes, expected: int) -> None:
    assert p.packet_length(word) == expected


@pytest.mark.parametrize(
    ("word", "why"),
    [
        (b"\x00\x00\x00\x00", "length 0"),
        (b"\x00\x10\x00\x01", "exceeds the limit"),
        (b"\xff\xff\xff\xff", "exceeds the limit"),
        (b"\x00\x00\x01", "4-byte length"),
    ],
)
def test_packet_length_refuses(word: bytes, why: str) -> None:
    with pytest.raises(p.ProtocolError, match=why):
        p.packet_length(word)


def test_split_packets_keeps_the_incomplete_rest() -> None:
    data = pkt(b"O", b"x" * 12) + pkt(b"L", b"A\0b\0") + pkt(b"B", b"body")[:6]
    packets, rest = p.split_packets(data)
    assert packets == [(b"O", b"x" * 12), (b"L", b"A\0b\0")]
    assert rest == pkt(b"B", b"body")[:6]


def test_packet_builds_what_split_reads() -> None:
    assert p.packet(b"c") == b"\x00\x00\x00\x01c"
    assert p.split_packets(p.packet(b"B", b"\r\n"))[0] == [(b"B", b"\r\n")]


# -- commands ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "payload", "expected"),
    [
        (b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF), p.OptNeg(6, 0x1FF, 0x1FFFFF)),
        (b"D", b"C", p.Macro(b"C", ())),
        (b"D", b"Mi\x004XyZ\x00{mail_addr}\x00a@b\x00", p.Macro(b"M", ((b"i", b"4XyZ"), (b"{mail_addr}", b"a@b")))),
        (b"D", b"Mlonely\x00", p.Macro(b"M", ())),
        (b"C", b"mx.example\x004\x9c\x40192.0.2.1\x00", p.Connect(b"mx.example", b"4", 40000, b"192.0.2.1")),
        (b"C", b"[1.2.3.4]\x00U", p.Connect(b"[1.2.3.4]", b"U", 0, b"")),
        (b"C", b"local\x00L\x00\x00/run/x\x00", p.Connect(b"local", b"L", 0, b"/run/x")),
        (b"H", b"client.test\x00", p.Helo(b"client.test")),
        (b"M", b"<a@b>\x00SIZE=10\x00", p.Mail((b"<a@b>", b"SIZE=10"))),
        (b"R", b"<c@d>\x00", p.Rcpt((b"<c@d>",))),
        (b"L", b"Subject\x00hello\x00", p.Header(b"Subject", b"hello")),
        (b"L", b"X-Empty\x00\x00", p.Header(b"X-Empty", b"")),
        (b"L", b"Received\x00from a\n\tby b\x00", p.Header(b"Received", b"from a\n\tby b")),
        (b"N", b"", p.EndOfHeaders()),
        (b"B", b"line\r\n", p.Body(b"line\r\n")),
        (b"E", b"", p.EndOfBody(b"")),
        (b"E", b"tail\r\n", p.EndOfBody(b"tail\r\n")),
        (b"T", b"", p.Data()),
        (b"U", b"XFOO\x00", p.Unknown(b"XFOO")),
        (b"A", b"", p.Abort()),
        (b"Q", b"", p.Quit()),
        (b"K", b"", p.QuitNewConnection()),
    ],
)
def test_parse_command(code: bytes, payload: bytes, expected: p.Command) -> None:
    assert p.parse_command(code, payload) == expected


@pytest.mark.parametrize(
    ("code", "payload", "why"),
    [
        (b"Z", b"", "unknown milter command"),
        (b"c", b"", "unknown milter command"),  # a reply code sent as a command
        (b"O", b"\x00\x00\x00\x06", "expected 12 bytes"),
        (b"D", b"", "command code it belongs to"),
        (b"D", b"Mi\x00unterminated", "does not end in NUL"),
        (b"C", b"host", "hostname NUL and a family"),
        (b"C", b"host\x00", "hostname NUL and a family"),
        (b"C", b"host\x00X\x00\x00a\x00", "unknown address family"),
        (b"C", b"host\x004\x00", "2-byte port"),
        (b"C", b"host\x00U\x00\x00", "carries no port"),
        (b"H", b"a\x00b\x00", "expected 1"),
        (b"L", b"Subject\x00", "expected 2"),
        (b"L", b"Subject\x00a\x00b\x00", "expected 2"),
        (b"L", b"\x00value\x00", "empty header name"),
        (b"L", b"Subject\x00no-nul", "does not end in NUL"),
        (b"N", b"x", "carries no data"),
        (b"A", b"\x00", "carries no data"),
        (b"Q", b"bye", "carries no data"),
    ],
)
def test_parse_command_refuses(code: bytes, payload: bytes, why: str) -> None:
    with pytest.raises(p.ProtocolError, match=why):
        p.parse_command(code, payload)


# -- negotiation --------------------------------------------------------------------------------------


def test_negotiate_with_postfix_offer_keeps_only_what_we_use() -> None:
    agreed = p.negotiate(p.OptNeg(6, POSTFIX_ACTIONS, POSTFIX_STEPS))
    assert agreed.version == 6
    assert agreed.actions == p.SMFIF_ADDHDRS | p.SMFIF_CHGHDRS  # never the body
    assert not agreed.actions & p.SMFIF_CHGBODY
    assert agreed.steps == p.WANTED_STEPS
    assert not agreed.steps & (p.SMFIP_NOHDRS | p.SMFIP_NOBODY | p.SMFIP_NR_BODY)  # we need those


def test_negotiate_asks_only_for_offered_steps() -> None:
    agreed = p.negotiate(p.OptNeg(2, p.SMFIF_ADDHDRS | p.SMFIF_CHGHDRS, p.SMFIP_NOCONNECT | p.SMFIP_NOHELO))
    assert agreed == p.OptNeg(2, p.ACTIONS, p.SMFIP_NOCONNECT | p.SMFIP_NOHELO)


def test_negotiate_caps_the_version() -> None:
    assert p.negotiate(p.OptNeg(9, POSTFIX_ACTIONS, 0)).version == 6


@pytest.mark.parametrize(
    ("offer", "why"),
    [
        (p.OptNeg(1, POSTFIX_ACTIONS, POSTFIX_STEPS), "version 1"),
        (p.OptNeg(0, POSTFIX_ACTIONS, POSTFIX_STEPS), "version 0"),
        (p.OptNeg(6, p.SMFIF_ADDHDRS, POSTFIX_STEPS), "SMFIF_CHGHDRS"),
        (p.OptNeg(6, 0, 0), "cannot add its headers"),
    ],
)
def test_negotiate_refuses(offer: p.OptNeg, why: str) -> None:
    with pytest.raises(p.ProtocolError, match=why):
        p.negotiate(offer)


@pytest.mark.parametrize(
    ("code", "steps", "expected"),
    [
        (p.SMFIC_HEADER, 0, True),
        (p.SMFIC_HEADER, p.SMFIP_NR_HDR, False),
        (p.SMFIC_BODY, p.SMFIP_NR_HDR, True),
        (p.SMFIC_BODY, p.SMFIP_NR_BODY, False),
        (p.SMFIC_CONNECT, p.SMFIP_NR_CONN, False),
        (p.SMFIC_BODYEOB, 0xFFFFFFFF, True),
        (p.SMFIC_MACRO, 0, False),
        (p.SMFIC_ABORT, 0, False),
        (p.SMFIC_QUIT, 0, False),
        (b"Z", 0, False),
    ],
)
def test_expects_reply(code: bytes, steps: int, expected: bool) -> None:
    assert p.expects_reply(code, steps) is expected


# -- replies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "wire"),
    [
        (p.reply(p.SMFIR_CONTINUE), pkt(b"c")),
        (p.reply(p.SMFIR_SKIP), pkt(b"s")),
        (p.optneg(p.OptNeg(6, 0x11, 0x6FF)), pkt(b"O", struct.pack("!III", 6, 0x11, 0x6FF))),
        (p.insert_header(0, "X-Mailtriage-Category", "billing"), pkt(b"i", b"\0\0\0\0X-Mailtriage-Category\0billing\0")),
        (p.add_header("X-A", "b"), pkt(b"h", b"X-A\0b\0")),
        (p.delete_header(2, b"x-mailtriage-category"), pkt(b"m", b"\0\0\0\x02x-mailtriage-category\0\0")),
        (p.change_header(1, "Subject", "new"), pkt(b"m", b"\0\0\0\x01Subject\0new\0")),
        (p.reply_code("451 4.3.0 try 100% later"), pkt(b"y", b"451 4.3.0 try 100%% later\0")),
    ],
)
def test_reply_bytes(built: bytes, wire: bytes) -> None:
    assert built == wire


@pytest.mark.parametrize(
    "text", ["250 2.0.0 ok", "451 5.3.0 mismatch", "451 4.3.0 two\r\nlines", "45x 4.3.0 nope", "451 4.3.0 caf\u00e9"]
)
def test_reply_code_refuses_what_an_mta_would_not_take(text: str) -> None:
    with pytest.raises(ValueError):
        p.reply_code(text)


@pytest.mark.parametrize(
    ("name", "value"),
    [("", "v"), ("Bad Name", "v"), ("Colon:", "v"), ("X-A", "two\r\nlines"), ("X-A", "nul\0")],
)
def test_header_edits_refuse_what_would_break_the_header(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        p.add_header(name, value)


def test_change_header_index_counts_from_one() -> None:
    with pytest.raises(ValueError):
        p.delete_header(0, "X-A")


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (pkt(b"c"), p.Reply(b"c")),
        (pkt(b"y", b"451 4.3.0 x\0"), p.Reply(b"y", b"451 4.3.0 x")),
        (pkt(b"i", b"\0\0\0\x03N\0v\0"), p.Modification(b"i", 3, b"N", b"v")),
        (pkt(b"m", b"\0\0\0\x01N\0\0"), p.Modification(b"m", 1, b"N", b"")),
        (pkt(b"h", b"N\0v\0"), p.Modification(b"h", None, b"N", b"v")),
    ],
)
def test_parse_response(wire: bytes, expected: p.Response) -> None:
    (code, payload), = p.split_packets(wire)[0]
    assert p.parse_response(code, payload) == expected


@pytest.mark.parametrize(("code", "payload"), [(b"c", b"x"), (b"i", b"\0\0"), (b"m", b"\0\0\0\x01N\0"), (b"?", b"")])
def test_parse_response_refuses(code: bytes, payload: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_response(code, payload)


# -- the session ----------------------------------------------------------------------------------------


def negotiated(max_message_size: int = 10_000, on_error: str = "tempfail", steps: int = POSTFIX_STEPS) -> MilterSession:
    session = MilterSession(max_message_size, on_error)  # type: ignore[arg-type]
    out = session.receive(p.SMFIC_OPTNEG, p.OptNeg(6, POSTFIX_ACTIONS, steps))
    assert isinstance(out, Send) and out.packets == (p.optneg(p.OptNeg(6, p.ACTIONS, steps & p.WANTED_STEPS)),)
    return session


def feed(session: MilterSession, *commands: tuple[bytes, p.Command]) -> list[object]:
    return [session.receive(code, cmd) for code, cmd in commands]


def header(name: bytes, value: bytes) -> tuple[bytes, p.Command]:
    return p.SMFIC_HEADER, p.Header(name, value)


def test_session_wants_optneg_first() -> None:
    with pytest.raises(p.ProtocolError, match="SMFIC_OPTNEG first"):
        MilterSession(100).receive(p.SMFIC_HEADER, p.Header(b"A", b"b"))


def test_session_refuses_a_second_optneg() -> None:
    with pytest.raises(p.ProtocolError, match="again"):
        negotiated().receive(p.SMFIC_OPTNEG, p.OptNeg(6, POSTFIX_ACTIONS, POSTFIX_STEPS))


def test_session_replies_follow_the_negotiated_steps() -> None:
    # An MTA that cannot leave anything out gets a CONTINUE for every event but MACRO.
    session = negotiated(steps=0)
    outs = feed(session, (p.SMFIC_MACRO, p.Macro(b"C", ())), (p.SMFIC_CONNECT, p.Connect(b"h", b"U", 0, b"")),
                (p.SMFIC_HELO, p.Helo(b"h")), header(b"Subject", b"x"), (p.SMFIC_EOH, p.EndOfHeaders()),
                (p.SMFIC_BODY, p.Body(b"hi\r\n")))
    assert outs == [Send(), *[Send((p.reply(p.SMFIR_CONTINUE),))] * 5]
    # Postfix's offer: headers go without a reply.
    assert feed(negotiated(), header(b"Subject", b"x")) == [Send()]


def test_session_holds_the_message_and_classifies_at_end_of_body() -> None:
    session = negotiated()
    feed(session, header(b"Subject", b"invoice"), header(b"Received", b"from a\n\tby b"),
         (p.SMFIC_BODY, p.Body(b"line one\r\n")))
    out = session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b"tail\r\n"))
    assert out == Classify(b"Subject: invoice\r\nReceived: from a\r\n\tby b\r\n\r\nline one\r\ntail\r\n", False, 58)


def test_session_beyond_the_limit_holds_a_prefix_and_skips_the_body() -> None:
    session = negotiated(max_message_size=40)
    feed(session, header(b"Subject", b"invoice"))  # 18 bytes held
    first = session.receive(p.SMFIC_BODY, p.Body(b"a" * 30))
    assert first == Send((p.reply(p.SMFIR_SKIP),))  # over the limit: the MTA may stop sending
    out = session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b""))
    assert isinstance(out, Classify)
    assert out.truncated and out.size == 48
    assert out.raw == b"Subject: invoice\r\n\r\n" + b"a" * 22
    assert session.peak_held == 40


def test_session_without_skip_keeps_reading_but_holds_no_more() -> None:
    session = negotiated(max_message_size=20, steps=0)
    for _ in range(50):
        assert session.receive(p.SMFIC_BODY, p.Body(b"x" * 1000)) == Send((p.reply(p.SMFIR_CONTINUE),))
    assert session.held == 20 and session.peak_held == 20


def test_session_headers_over_the_limit_are_a_prefix_too() -> None:
    session = negotiated(max_message_size=30)
    feed(session, header(b"Subject", b"x" * 10), header(b"From", b"y" * 30), header(b"To", b"z"))
    out = session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b""))
    assert isinstance(out, Classify) and out.truncated
    assert out.raw == b"Subject: " + b"x" * 10 + b"\r\n\r\n"  # "To" is not held: it came after a gap


def test_tagged_deletes_every_forged_field_highest_index_first_then_inserts_ours() -> None:
    session = negotiated()
    feed(session, header(b"X-Mailtriage-Category", b"refunds"), header(b"From", b"a@b"),
         header(b"x-mailtriage-category", b"login"), header(b"X-MAILTRIAGE-Confidence", b"1.0"),
         header(b"X-Mailtriage-Anything", b"z"), header(b"X-Mailtriagexyz", b"x"), header(b"X-Other", b"kept"))
    session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b""))
    # Any name that starts with x-mailtriage is ours to remove (as core.tagging strips it on the
    # SMTP path): a near miss costs nothing, a miss would let a sender pick the folder.
    assert session.tagged(DECISION) == (
        p.delete_header(2, b"X-Mailtriage-Category"),
        p.delete_header(1, b"X-Mailtriage-Category"),
        p.delete_header(1, b"X-MAILTRIAGE-Confidence"),
        p.delete_header(1, b"X-Mailtriage-Anything"),
        p.delete_header(1, b"X-Mailtriagexyz"),
        p.insert_header(0, "X-Mailtriage-Confidence", "0.9123"),
        p.insert_header(0, "X-Mailtriage-Category", "billing"),
        p.reply(p.SMFIR_CONTINUE),
    )


def test_tagged_unsure_says_unsure_and_a_second_message_starts_clean() -> None:
    session = negotiated()
    feed(session, header(b"X-Mailtriage-Category", b"refunds"))
    session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b""))
    session.tagged(DECISION)
    session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b""))
    assert session.tagged(Decision("billing", 0.4, True, "Support/Unsure")) == (
        p.insert_header(0, "X-Mailtriage-Confidence", "0.4000"),
        p.insert_header(0, "X-Mailtriage-Category", "unsure"),
        p.reply(p.SMFIR_CONTINUE),
    )


def test_failed_tempfails_by_default_and_accept_still_removes_forgeries() -> None:
    for on_error, expected in [
        ("tempfail", (p.reply_code(TEMPFAIL_TEXT),)),
        ("accept", (p.delete_header(1, b"X-Mailtriage-Category"), p.reply(p.SMFIR_CONTINUE))),
    ]:
        session = negotiated(on_error=on_error)
        feed(session, header(b"X-Mailtriage-Category", b"refunds"))
        session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b""))
        assert session.failed() == expected


def test_abort_forgets_the_message() -> None:
    session = negotiated()
    feed(session, header(b"X-Mailtriage-Category", b"refunds"), (p.SMFIC_BODY, p.Body(b"old body\r\n")),
         (p.SMFIC_ABORT, p.Abort()), header(b"Subject", b"new"))
    out = session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b""))
    assert isinstance(out, Classify) and out.raw == b"Subject: new\r\n\r\n"
    assert session.tagged(DECISION)[0] == p.insert_header(0, "X-Mailtriage-Confidence", "0.9123")


def test_quit_closes() -> None:
    assert negotiated().receive(p.SMFIC_QUIT, p.Quit()) == Close("quit")


def test_a_flood_of_distinct_forged_names_is_tempfailed_not_half_cleaned() -> None:
    session = negotiated(on_error="accept")
    for i in range(150):
        session.receive(p.SMFIC_HEADER, p.Header(b"X-Mailtriage-F%d" % i, b"x"))
    out = session.receive(p.SMFIC_BODYEOB, p.EndOfBody(b""))
    assert isinstance(out, Send) and out.packets == (p.reply_code(TEMPFAIL_TEXT),) and out.note


# -- the test client's model of Postfix ---------------------------------------------------------------------


def test_split_message_like_postfix() -> None:
    raw = b"Subject:  two spaces\r\nReceived: from a\r\n\tby b\nX-Bare:\r\n\r\nbody\nno eol"
    headers, body = split_message(raw)
    assert headers == [(b"Subject", b" two spaces"), (b"Received", b"from a\n\tby b"), (b"X-Bare", b"")]
    assert body == b"body\r\nno eol\r\n"


def test_apply_edits_like_postfix_cleanup() -> None:
    raw = b"A: 1\r\nx-mailtriage-category: f1\r\nB: 2\r\nX-Mailtriage-Category: f2\r\n\r\nbody\r\n"
    result = MilterResult(modifications=[
        p.Modification(p.SMFIR_CHGHEADER, 2, b"X-Mailtriage-Category", b""),
        p.Modification(p.SMFIR_CHGHEADER, 1, b"X-Mailtriage-Category", b""),
        p.Modification(p.SMFIR_INSHEADER, 0, b"X-Top", b"t"),
        p.Modification(p.SMFIR_ADDHEADER, None, b"X-End", b"e"),
        p.Modification(p.SMFIR_CHGHEADER, 1, b"b", b"changed"),
    ])
    assert result.apply(raw) == b"X-Top: t\r\nA: 1\r\nB: changed\r\nX-End: e\r\n\r\nbody\r\n"


# -- boundaries ---------------------------------------------------------------------------------------------


def test_milter_imports_no_other_edge_no_aiosmtpd_no_torch() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "daemon" / "milter"
    files = sorted(root.glob("*.py"))
    assert {f.name for f in files} >= {"protocol.py", "session.py", "server.py"}
    banned = ("mailtriage.imap", "mailtriage.smtp", "mailtriage.model", "aiosmtpd", "torch", "transformers")
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad = [n for n in names if any(n == b or n.startswith(b + ".") for b in banned)]
            if bad:
                found[path.name] = bad
    assert found == {}

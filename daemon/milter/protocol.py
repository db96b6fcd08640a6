"""The Sendmail milter protocol (version 6, as Postfix and Sendmail speak it) as pure functions over bytes.

A packet is a 4-byte big-endian length, then that many bytes: a one-byte code and its payload.
The MTA sends commands (``SMFIC_*``), the filter answers (``SMFIR_*``). Strings are NUL-terminated.
No sockets here: the server (``mailtriage.milter.server``) and the MTA-side test client
(``mailtriage.testing.milter``) both build and parse through this module, so one table of codes
and one set of checks serve both ends. Every parse failure is a ``ProtocolError``; a caller that
gets one closes the connection (the MTA then applies its ``milter_default_action``).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Union

VERSION = 6
# Most bytes one packet may carry after its length word. Postfix sends body chunks of 65,535
# bytes and a header as one packet (header_size_limit, 102,400 by default); Sendmail's chunks are
# 65,535 unless a filter asks for 256K/1M (we never do). 1 MiB leaves room and bounds what one
# packet can make us allocate: a larger length word is refused before a byte of it is read.
MAX_PACKET = 1024 * 1024
LENGTH = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")
_INDEX = struct.Struct("!I")
_PORT = struct.Struct("!H")

# -- commands, MTA -> filter ----------------------------------------------------------------------
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# -- replies, filter -> MTA -----------------------------------------------------------------------
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# -- actions the filter may take (OPTNEG's second word) --------------------------------------------
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100

# -- protocol steps (OPTNEG's third word): what the MTA may leave out ------------------------------
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

# What mailtriage needs: add our two headers, delete forged ones. Never the body (no CHGBODY).
ACTIONS = SMFIF_ADDHDRS | SMFIF_CHGHDRS
# What mailtriage asks the MTA to leave out when it can: the envelope and the chatter around the
# message are not used; headers come without a reply each; SKIP lets us stop a body past the limit.
WANTED_STEPS = (
    SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOUNKNOWN | SMFIP_NODATA
    | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_SKIP
)

# The reply a command wants unless the negotiated steps say "no reply" (None: never a reply).
_NO_REPLY_FLAG: dict[bytes, int | None] = {
    SMFIC_CONNECT: SMFIP_NR_CONN,
    SMFIC_HELO: SMFIP_NR_HELO,
    SMFIC_MAIL: SMFIP_NR_MAIL,
    SMFIC_RCPT: SMFIP_NR_RCPT,
    SMFIC_DATA: SMFIP_NR_DATA,
    SMFIC_UNKNOWN: SMFIP_NR_UNKN,
    SMFIC_HEADER: SMFIP_NR_HDR,
    SMFIC_EOH: SMFIP_NR_EOH,
    SMFIC_BODY: SMFIP_NR_BODY,
    SMFIC_BODYEOB: 0,
    SMFIC_OPTNEG: 0,
    SMFIC_MACRO: None,
    SMFIC_ABORT: None,
    SMFIC_QUIT: None,
    SMFIC_QUIT_NC: None,
}
COMMANDS = frozenset(_NO_REPLY_FLAG)
REPLIES = frozenset({
    SMFIR_ADDRCPT, SMFIR_DELRCPT, SMFIR_ADDRCPT_PAR, SMFIR_SHUTDOWN, SMFIR_ACCEPT, SMFIR_REPLBODY,
    SMFIR_CONTINUE, SMFIR_DISCARD, SMFIR_CHGFROM, SMFIR_CONN_FAIL, SMFIR_ADDHEADER, SMFIR_INSHEADER,
    SMFIR_SETSYMLIST, SMFIR_CHGHEADER, SMFIR_PROGRESS, SMFIR_QUARANTINE, SMFIR_REJECT, SMFIR_SKIP,
    SMFIR_TEMPFAIL, SMFIR_REPLYCODE, SMFIC_OPTNEG,
})
# Replies that end the MTA's wait for one command; modifications and PROGRESS come before one.
FINAL_REPLIES = frozenset({
    SMFIR_ACCEPT, SMFIR_CONTINUE, SMFIR_DISCARD, SMFIR_REJECT, SMFIR_TEMPFAIL, SMFIR_REPLYCODE,
    SMFIR_SKIP, SMFIR_SHUTDOWN, SMFIR_CONN_FAIL,
})


class ProtocolError(ValueError):
    """The peer broke the milter protocol (framing, an unknown code, a malformed payload, a bad
    negotiation). The message says what was found and what was expected."""


# -- values -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptNeg:
    """SMFIC_OPTNEG both ways: the MTA's offer, and the filter's choice (a subset of it)."""

    version: int
    actions: int
    steps: int


@dataclass(frozen=True)
class Macro:
    command: bytes  # the command these macros come with
    pairs: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Connect:
    hostname: bytes
    family: bytes  # b"4", b"6", b"L" (unix) or b"U" (unknown)
    port: int
    address: bytes


@dataclass(frozen=True)
class Helo:
    name: bytes


@dataclass(frozen=True)
class Mail:
    args: tuple[bytes, ...]


@dataclass(frozen=True)
class Rcpt:
    args: tuple[bytes, ...]


@dataclass(frozen=True)
class Header:
    name: bytes
    value: bytes  # folded lines joined by b"\n" (Postfix) or b"\r\n"; one leading space eaten


@dataclass(frozen=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True)
class Body:
    chunk: bytes


@dataclass(frozen=True)
class EndOfBody:
    chunk: bytes  # Sendmail may send the last body bytes with it; Postfix never does


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Unknown:
    line: bytes


@dataclass(frozen=True)
class Abort:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class QuitNewConnection:
    pass


Command = Union[
    OptNeg, Macro, Connect, Helo, Mail, Rcpt, Header, EndOfHeaders, Body, EndOfBody, Data, Unknown, Abort, Quit,
    QuitNewConnection,
]


@dataclass(frozen=True)
class Modification:
    """A header edit at end of message: SMFIR_ADDHEADER (index None), SMFIR_INSHEADER, SMFIR_CHGHEADER."""

    code: bytes
    index: int | None
    name: bytes
    value: bytes


@dataclass(frozen=True)
class Reply:
    """Any other filter reply: its code and, for SMFIR_REPLYCODE, the SMTP reply text."""

    code: bytes
    text: bytes = b""


Response = Union[OptNeg, Modification, Reply]


# -- framing ----------------------------------------------------------------------------------------


def packet(code: bytes, payload: bytes = b"") -> bytes:
    """One packet: length word, code, payload."""
    if len(code) != 1:
        raise ValueError(f"a milter code is one byte, got {code!r}")
    return LENGTH.pack(1 + len(payload)) + code + payload


def packet_length(word: bytes, limit: int = MAX_PACKET) -> int:
    """The length a 4-byte length word announces (code + payload), checked against ``limit``."""
    if len(word) != LENGTH.size:
        raise ProtocolError(f"a packet starts with a 4-byte length, got {len(word)} byte(s)")
    (n,) = LENGTH.unpack(word)
    if n == 0:
        raise ProtocolError("packet length 0: every packet carries at least its one-byte code")
    if n > limit:
        raise ProtocolError(f"packet length {n} exceeds the limit of {limit} bytes")
    return n


def split_packets(data: bytes, limit: int = MAX_PACKET) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Whole packets at the front of ``data`` as (code, payload), and the incomplete rest."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while len(data) - pos >= LENGTH.size:
        n = packet_length(data[pos:pos + LENGTH.size], limit)
        end = pos + LENGTH.size + n
        if end > len(data):
            break
        out.append((data[pos + 4:pos + 5], data[pos + 5:end]))
        pos = end
    return out, data[pos:]


# -- strings ----------------------------------------------------------------------------------------


def _strings(payload: bytes, what: str) -> list[bytes]:
    if not payload.endswith(b"\0"):
        raise ProtocolError(f"{what}: expected NUL-terminated strings, the payload does not end in NUL")
    return payload[:-1].split(b"\0")


def _exactly(payload: bytes, n: int, what: str) -> list[bytes]:
    parts = _strings(payload, what)
    if len(parts) != n:
        raise ProtocolError(f"{what}: expected {n} NUL-terminated string(s), found {len(parts)}")
    return parts


def _cstring(value: bytes, what: str) -> bytes:
    if b"\0" in value:
        raise ValueError(f"{what} may not contain NUL: {value[:40]!r}")
    return value + b"\0"


# -- MTA -> filter ------------------------------------------------------------------------------------


def parse_command(code: bytes, payload: bytes) -> Command:
    """A command packet's value; ProtocolError for an unknown code or a malformed payload."""
    if code == SMFIC_OPTNEG:
        return parse_optneg(payload)
    if code == SMFIC_MACRO:
        if not payload:
            raise ProtocolError("SMFIC_MACRO: expected the command code it belongs to, found an empty payload")
        parts = _strings(payload[1:], "SMFIC_MACRO") if len(payload) > 1 else []
        # An odd trailing name has no value: ignored, as libmilter does.
        return Macro(payload[:1], tuple(zip(parts[0::2], parts[1::2])))
    if code == SMFIC_CONNECT:
        return _parse_connect(payload)
    if code == SMFIC_HELO:
        return Helo(_exactly(payload, 1, "SMFIC_HELO")[0])
    if code == SMFIC_MAIL:
        return Mail(tuple(_strings(payload, "SMFIC_MAIL")))
    if code == SMFIC_RCPT:
        return Rcpt(tuple(_strings(payload, "SMFIC_RCPT")))
    if code == SMFIC_HEADER:
        name, value = _exactly(payload, 2, "SMFIC_HEADER")
        if not name:
            raise ProtocolError("SMFIC_HEADER: empty header name")
        return Header(name, value)
    if code == SMFIC_BODY:
        return Body(payload)
    if code == SMFIC_BODYEOB:
        return EndOfBody(payload)
    if code == SMFIC_UNKNOWN:
        return Unknown(_exactly(payload, 1, "SMFIC_UNKNOWN")[0])
    simple = {SMFIC_EOH: EndOfHeaders, SMFIC_DATA: Data, SMFIC_ABORT: Abort, SMFIC_QUIT: Quit,
              SMFIC_QUIT_NC: QuitNewConnection}
    if code in simple:
        if payload:
            raise ProtocolError(f"command {code!r} carries no data, found {len(payload)} byte(s)")
        return simple[code]()
    raise ProtocolError(f"unknown milter command code {code!r}")


def parse_optneg(payload: bytes) -> OptNeg:
    # The filter's answer may append macro lists; an MTA's offer is the three words only.
    if len(payload) < _OPTNEG.size:
        raise ProtocolError(f"SMFIC_OPTNEG: expected 12 bytes (version, actions, steps), found {len(payload)}")
    version, actions, steps = _OPTNEG.unpack(payload[:_OPTNEG.size])
    return OptNeg(version, actions, steps)


def _parse_connect(payload: bytes) -> Connect:
    end = payload.find(b"\0")
    if end < 0 or end + 1 >= len(payload):
        raise ProtocolError("SMFIC_CONNECT: expected hostname NUL and a family byte")
    hostname, family, rest = payload[:end], payload[end + 1:end + 2], payload[end + 2:]
    if family == b"U":
        if rest:
            raise ProtocolError("SMFIC_CONNECT: family 'U' carries no port or address")
        return Connect(hostname, family, 0, b"")
    if family not in (b"4", b"6", b"L"):
        raise ProtocolError(f"SMFIC_CONNECT: unknown address family {family!r} (expected 4, 6, L or U)")
    if len(rest) < _PORT.size + 1:
        raise ProtocolError("SMFIC_CONNECT: expected a 2-byte port and a NUL-terminated address")
    (port,) = _PORT.unpack(rest[:_PORT.size])
    address = _exactly(rest[_PORT.size:], 1, "SMFIC_CONNECT address")[0]
    return Connect(hostname, family, port, address)


def optneg(offer: OptNeg) -> bytes:
    """SMFIC_OPTNEG (the MTA's offer) or the filter's answer: the same three words."""
    return packet(SMFIC_OPTNEG, _OPTNEG.pack(offer.version, offer.actions, offer.steps))


def command(code: bytes, *strings: bytes) -> bytes:
    """A command whose payload is NUL-terminated strings (HELO, MAIL, RCPT, HEADER, UNKNOWN)."""
    return packet(code, b"".join(_cstring(s, f"command {code!r}") for s in strings))


def macro(for_command: bytes, pairs: dict[bytes, bytes]) -> bytes:
    body = b"".join(_cstring(k, "macro name") + _cstring(v, "macro value") for k, v in pairs.items())
    return packet(SMFIC_MACRO, for_command + body)


def connect(hostname: bytes, family: bytes, port: int, address: bytes) -> bytes:
    rest = b"" if family == b"U" else _PORT.pack(port) + _cstring(address, "address")
    return packet(SMFIC_CONNECT, _cstring(hostname, "hostname") + family + rest)


def expects_reply(code: bytes, steps: int) -> bool:
    """Whether the filter answers ``code`` under the negotiated ``steps`` (NR_* flags say "no reply")."""
    flag = _NO_REPLY_FLAG.get(code)
    return flag is not None and not steps & flag


# -- negotiation --------------------------------------------------------------------------------------


def negotiate(offer: OptNeg) -> OptNeg:
    """The filter's answer to the MTA's offer: version <= 6, our actions, the steps we can skip.

    ProtocolError when the MTA cannot give us what tagging needs (add and change headers).
    """
    if offer.version < 2:
        raise ProtocolError(f"milter protocol version {offer.version} offered; mailtriage speaks 2 to {VERSION} "
                            "(set milter_protocol = 6 in Postfix's main.cf)")
    if offer.actions & ACTIONS != ACTIONS:
        raise ProtocolError(
            f"the MTA offers actions 0x{offer.actions:x} without SMFIF_ADDHDRS|SMFIF_CHGHDRS (0x{ACTIONS:x}): "
            "mailtriage cannot add its headers or remove forged ones"
        )
    return OptNeg(min(offer.version, VERSION), ACTIONS, offer.steps & WANTED_STEPS)


# -- filter -> MTA --------------------------------------------------------------------------------------

_REPLY_TEXT = re.compile(rb"^[45][0-9][0-9] [45]\.[0-9]{1,3}\.[0-9]{1,3} [\x20-\x7e]*$")


def reply(code: bytes) -> bytes:
    """A data-less reply: SMFIR_CONTINUE, SMFIR_ACCEPT, SMFIR_TEMPFAIL, SMFIR_SKIP, ..."""
    return packet(code)


def reply_code(text: str) -> bytes:
    """SMFIR_REPLYCODE: the SMTP reply the MTA gives its client, e.g. "451 4.3.0 try later".

    One line of printable ASCII with a 4xx/5xx code and a matching enhanced status; '%' doubled
    because Sendmail reads the text as a format string (Postfix undoes the doubling)."""
    raw = text.encode("ascii", "replace")
    if not text.isascii() or not _REPLY_TEXT.match(raw) or raw[0] != raw[4]:
        raise ValueError(f"not a one-line 4xx/5xx reply with a matching status code: {text!r}")
    return packet(SMFIR_REPLYCODE, raw.replace(b"%", b"%%") + b"\0")


def _header_name(name: str | bytes) -> bytes:
    raw = name.encode("ascii") if isinstance(name, str) else name
    if not raw or any(c <= 32 or c >= 127 or c == 58 for c in raw):
        raise ValueError(f"not a header field name: {raw!r}")
    return raw


def _header_value(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if b"\0" in raw or b"\r" in raw or b"\n" in raw:
        raise ValueError(f"a header value we set is one line without NUL: {raw[:60]!r}")
    return raw


def add_header(name: str | bytes, value: str | bytes) -> bytes:
    """SMFIR_ADDHEADER: append a field at the end of the header."""
    return packet(SMFIR_ADDHEADER, _header_name(name) + b"\0" + _header_value(value) + b"\0")


def insert_header(index: int, name: str | bytes, value: str | bytes) -> bytes:
    """SMFIR_INSHEADER: insert a field before the ``index``-th one (0 = on top)."""
    return packet(SMFIR_INSHEADER, _INDEX.pack(index) + _header_name(name) + b"\0" + _header_value(value) + b"\0")


def change_header(index: int, name: str | bytes, value: str | bytes) -> bytes:
    """SMFIR_CHGHEADER: replace the ``index``-th (from 1) field called ``name``; an empty value deletes it."""
    if index < 1:
        raise ValueError(f"header index counts from 1, got {index}")
    return packet(SMFIR_CHGHEADER, _INDEX.pack(index) + _header_name(name) + b"\0" + _header_value(value) + b"\0")


def delete_header(index: int, name: str | bytes) -> bytes:
    return change_header(index, name, b"")


def parse_response(code: bytes, payload: bytes) -> Response:
    """A filter reply as the MTA reads it (the test client's side); ProtocolError if malformed."""
    if code == SMFIC_OPTNEG:
        return parse_optneg(payload)
    if code == SMFIR_ADDHEADER:
        name, value = _exactly(payload, 2, "SMFIR_ADDHEADER")
        return Modification(code, None, name, value)
    if code in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
        if len(payload) < _INDEX.size:
            raise ProtocolError(f"reply {code!r}: expected a 4-byte index")
        (index,) = _INDEX.unpack(payload[:_INDEX.size])
        name, value = _exactly(payload[_INDEX.size:], 2, f"reply {code!r}")
        return Modification(code, index, name, value)
    if code == SMFIR_REPLYCODE:
        return Reply(code, _exactly(payload, 1, "SMFIR_REPLYCODE")[0])
    if code in REPLIES:
        if code in FINAL_REPLIES or code == SMFIR_PROGRESS:
            if payload:
                raise ProtocolError(f"reply {code!r} carries no data, found {len(payload)} byte(s)")
        return Reply(code, payload)
    raise ProtocolError(f"unknown milter reply code {code!r}")

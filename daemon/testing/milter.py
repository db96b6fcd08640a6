"""An MTA-side milter client that speaks the protocol the way Postfix's milter8 does: the test peer
of ``mailtriage.milter`` where a test needs control of every packet (tests/test_postfix_milter.py
puts a real Postfix in front of it instead).

What it copies from Postfix: the OPTNEG offer (protocol 6, every action, every step it can leave
out), one connection per SMTP session with MACRO packets before events, headers split into name
and value with one leading space eaten and folded lines joined by "\\n", the body as CRLF lines in
65,535-byte chunks, no data on SMFIC_BODYEOB, SMFIR_SKIP honoured, replies awaited unless the
filter negotiated "no reply". ``MilterResult.apply`` edits the message as Postfix's cleanup does:
CHGHEADER counts same-named fields case-insensitively from 1 and deletes on an empty value,
INSHEADER 0 inserts on top, ADDHEADER appends. Blocking sockets; never imported by the product.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailtriage.milter import protocol as p

POSTFIX_ACTIONS = (
    p.SMFIF_ADDHDRS | p.SMFIF_CHGBODY | p.SMFIF_ADDRCPT | p.SMFIF_DELRCPT | p.SMFIF_CHGHDRS | p.SMFIF_QUARANTINE
    | p.SMFIF_CHGFROM | p.SMFIF_ADDRCPT_PAR | p.SMFIF_SETSYMLIST
)
POSTFIX_STEPS = (
    p.SMFIP_NOCONNECT | p.SMFIP_NOHELO | p.SMFIP_NOMAIL | p.SMFIP_NORCPT | p.SMFIP_NOBODY | p.SMFIP_NOHDRS
    | p.SMFIP_NOEOH | p.SMFIP_NOUNKNOWN | p.SMFIP_NODATA | p.SMFIP_SKIP | p.SMFIP_RCPT_REJ | p.SMFIP_NR_CONN
    | p.SMFIP_NR_HELO | p.SMFIP_NR_MAIL | p.SMFIP_NR_RCPT | p.SMFIP_NR_DATA | p.SMFIP_NR_UNKN | p.SMFIP_NR_HDR
    | p.SMFIP_NR_EOH | p.SMFIP_NR_BODY | p.SMFIP_HDR_LEADSPC
)
BODY_CHUNK = 65535
_HEADER_START = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_EOL = re.compile(rb"\r\n|\r|\n")


def split_message(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers as (name, value), body with CRLF lines) the way Postfix hands them to a milter:
    value without the one space after the colon, folded lines joined by "\\n"; the first line
    that is neither a field nor a continuation starts the body."""
    lines = _EOL.split(raw)
    if lines and lines[-1] == b"":
        lines.pop()  # the last line's ending, not an empty line after it
    headers: list[tuple[bytes, bytes]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
            i += 1
            continue
        m = _HEADER_START.match(line)
        if not m:
            break
        value = line[m.end():]
        headers.append((m.group(1), value[1:] if value.startswith(b" ") else value))
        i += 1
    if i < len(lines) and lines[i] == b"":
        i += 1  # the blank line between header and body is not body
    body_lines = lines[i:]
    body = b"".join(line + b"\r\n" for line in body_lines)
    return headers, body


@dataclass
class MilterResult:
    """What the filter answered at end of message: its edits in order, and the final verdict."""

    modifications: list[p.Modification] = field(default_factory=list)
    final: p.Reply | None = None
    body_skipped: bool = False

    @property
    def accepted(self) -> bool:
        return self.final is not None and self.final.code in (p.SMFIR_CONTINUE, p.SMFIR_ACCEPT)

    @property
    def smtp_reply(self) -> str:
        """What Postfix would tell its SMTP client (for a REPLYCODE: that text)."""
        if self.final is None:
            return "(none)"
        if self.final.code == p.SMFIR_REPLYCODE:
            return self.final.text.decode("ascii", "replace").replace("%%", "%")
        if self.final.code == p.SMFIR_TEMPFAIL:
            return "451 4.7.1 Service unavailable - try again later"
        return {p.SMFIR_REJECT: "550 5.7.1 Command rejected"}.get(self.final.code, "250 OK")

    def apply(self, raw: bytes) -> bytes:
        """``raw`` edited as Postfix's cleanup applies these modifications (CRLF line endings)."""
        headers, body = split_message(raw)
        for mod in self.modifications:
            if mod.code == p.SMFIR_ADDHEADER:
                headers.append((mod.name, mod.value))
            elif mod.code == p.SMFIR_INSHEADER:
                assert mod.index is not None
                headers.insert(min(mod.index, len(headers)), (mod.name, mod.value))
            elif mod.code == p.SMFIR_CHGHEADER:
                assert mod.index is not None
                want = max(mod.index, 1)  # Postfix: index 0 means 1, as Sendmail does
                seen = 0
                for pos, (name, _value) in enumerate(headers):
                    if name.lower() == mod.name.lower():
                        seen += 1
                        if seen == want:
                            if mod.value:
                                headers[pos] = (name, mod.value)
                            else:
                                del headers[pos]
                            break
            else:
                raise AssertionError(f"unexpected modification {mod.code!r}")
        text = b"".join(name + b": " + value.replace(b"\n", b"\r\n") + b"\r\n" for name, value in headers)
        return text + b"\r\n" + body

    def added(self) -> dict[str, str]:
        """The fields the filter added, name -> value."""
        return {m.name.decode(): m.value.decode() for m in self.modifications if m.code != p.SMFIR_CHGHEADER}

    def deleted(self) -> list[tuple[str, int]]:
        return [(m.name.decode(), m.index or 0) for m in self.modifications
                if m.code == p.SMFIR_CHGHEADER and not m.value]


class MilterClient:
    """One MTA connection to a milter. ``negotiate()`` first, then ``message(raw)`` any number of
    times, then ``quit()``. ``version``/``actions``/``steps`` are the OPTNEG offer."""

    def __init__(
        self, host: str, port: int, *, timeout: float = 30.0, version: int = 6, actions: int = POSTFIX_ACTIONS,
        steps: int = POSTFIX_STEPS,
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.offer = p.OptNeg(version, actions, steps)
        self.agreed: p.OptNeg | None = None
        self._buffer = b""

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- raw packets --------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> tuple[bytes, bytes]:
        """The next reply packet; EOFError when the filter closed the connection."""
        while True:
            packets, rest = p.split_packets(self._buffer, limit=1 << 30)
            if packets:
                code, payload = packets[0]
                self._buffer = self._buffer[p.LENGTH.size + 1 + len(payload):]
                return code, payload
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the milter closed the connection")
            self._buffer += data

    def read_until_closed(self, deadline_s: float = 10.0) -> list[tuple[bytes, bytes]]:
        """Every reply until the filter closes; TimeoutError if it neither answers nor closes."""
        out: list[tuple[bytes, bytes]] = []
        end = time.monotonic() + deadline_s
        while True:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                out.append(self.read())
            except EOFError:
                return out
            except (ConnectionResetError, BrokenPipeError):
                return out
            except socket.timeout as exc:
                raise TimeoutError(f"the milter neither answered nor closed within {deadline_s} s") from exc

    # -- the conversation ------------------------------------------------------------------------------

    def negotiate(self) -> p.OptNeg:
        self.send(p.optneg(self.offer))
        code, payload = self.read()
        if code != p.SMFIC_OPTNEG:
            raise p.ProtocolError(f"expected the filter's SMFIC_OPTNEG, got {code!r}")
        self.agreed = p.parse_optneg(payload)
        if self.agreed.actions & ~self.offer.actions:
            raise p.ProtocolError(f"the filter asks for actions 0x{self.agreed.actions:x} beyond the offer")
        return self.agreed

    def event(self, code: bytes, data: bytes, skip_flag: int = 0) -> list[p.Response]:
        """Send one command (unless the filter asked not to get it) and read its replies: edits,
        then one final reply (none if the filter negotiated "no reply" for it)."""
        assert self.agreed is not None, "negotiate() first"
        steps = self.agreed.steps
        if skip_flag and steps & skip_flag:
            return []
        self.send(data)
        if not p.expects_reply(code, steps):
            return []
        replies: list[p.Response] = []
        while True:
            rcode, payload = self.read()
            response = p.parse_response(rcode, payload)
            replies.append(response)
            if rcode in p.FINAL_REPLIES:
                return replies
            if rcode not in (p.SMFIR_PROGRESS, p.SMFIR_ADDHEADER, p.SMFIR_INSHEADER, p.SMFIR_CHGHEADER):
                raise p.ProtocolError(f"reply {rcode!r} is not allowed here")
            if rcode != p.SMFIR_PROGRESS and code != p.SMFIC_BODYEOB:
                raise p.ProtocolError(f"header edit {rcode!r} before end of message")

    def connect_events(self, helo: bytes = b"client.test", client: bytes = b"127.0.0.1") -> None:
        self.send(p.macro(p.SMFIC_CONNECT, {b"j": b"mx.test", b"{daemon_name}": b"mx.test", b"_": b"client.test"}))
        self._must_continue(self.event(p.SMFIC_CONNECT, p.connect(b"client.test", b"4", 40000, client),
                                       p.SMFIP_NOCONNECT), "CONNECT")
        self.send(p.macro(p.SMFIC_HELO, {}))
        self._must_continue(self.event(p.SMFIC_HELO, p.command(p.SMFIC_HELO, helo), p.SMFIP_NOHELO), "HELO")

    def message(
        self, raw: bytes, sender: bytes = b"<customer@example.com>",
        recipients: Sequence[bytes] = (b"<support@example.com>",),
    ) -> MilterResult:
        """One message's events through end of body; the filter's edits and verdict."""
        self.send(p.macro(p.SMFIC_MAIL, {b"i": b"4XyZ12", b"{mail_addr}": sender.strip(b"<>")}))
        self._must_continue(self.event(p.SMFIC_MAIL, p.command(p.SMFIC_MAIL, sender), p.SMFIP_NOMAIL), "MAIL")
        for rcpt in recipients:
            self.send(p.macro(p.SMFIC_RCPT, {b"{rcpt_addr}": rcpt.strip(b"<>")}))
            self._must_continue(self.event(p.SMFIC_RCPT, p.command(p.SMFIC_RCPT, rcpt), p.SMFIP_NORCPT), "RCPT")
        self._must_continue(self.event(p.SMFIC_DATA, p.packet(p.SMFIC_DATA), p.SMFIP_NODATA), "DATA")
        headers, body = split_message(raw)
        for name, value in headers:
            self._must_continue(self.event(p.SMFIC_HEADER, p.command(p.SMFIC_HEADER, name, value.replace(b"\0", b"")),
                                           p.SMFIP_NOHDRS), "HEADER")
        self._must_continue(self.event(p.SMFIC_EOH, p.packet(p.SMFIC_EOH), p.SMFIP_NOEOH), "EOH")
        result = MilterResult()
        for start in range(0, len(body), BODY_CHUNK):
            replies = self.event(p.SMFIC_BODY, p.packet(p.SMFIC_BODY, body[start:start + BODY_CHUNK]), p.SMFIP_NOBODY)
            if replies and isinstance(replies[-1], p.Reply) and replies[-1].code == p.SMFIR_SKIP:
                result.body_skipped = True
                break
            self._must_continue(replies, "BODY")
        for reply in self.event(p.SMFIC_BODYEOB, p.packet(p.SMFIC_BODYEOB)):
            if isinstance(reply, p.Modification):
                result.modifications.append(reply)
            elif isinstance(reply, p.Reply) and reply.code != p.SMFIR_PROGRESS:
                result.final = reply
        return result

    def abort(self) -> None:
        self.send(p.packet(p.SMFIC_ABORT))

    def quit(self) -> None:
        try:
            self.send(p.packet(p.SMFIC_QUIT))
        finally:
            self.close()

    @staticmethod
    def _must_continue(replies: list[p.Response], what: str) -> None:
        for reply in replies:
            if not (isinstance(reply, p.Reply) and reply.code in (p.SMFIR_CONTINUE, p.SMFIR_PROGRESS)):
                raise AssertionError(f"{what}: the filter answered {reply!r} where Postfix expects continue")


def tag_once(host: str, port: int, raw: bytes, timeout: float = 30.0) -> MilterResult:
    """One connection, one message, quit: what Postfix does for an SMTP session with one mail."""
    with MilterClient(host, port, timeout=timeout) as client:
        client.negotiate()
        client.connect_events()
        result = client.message(raw)
        client.quit()
    return result

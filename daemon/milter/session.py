"""One milter connection's state without I/O: what to answer each command, how much of the message
to hold for classification, and the header edits that tag it at end of message.

Kept pure (commands in, packets out) so the rules that matter - never more than
``max_message_size`` held, every forged X-Mailtriage-* field deleted by its per-name index, the
body never touched, ``on_error`` applied - are tested without a socket. The server
(``mailtriage.milter.server``) owns the socket, the deadline and the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mailtriage.core.routing import Decision
from mailtriage.core.tagging import crlf, is_mailtriage_header, tag_fields
from mailtriage.milter import protocol as p

OnError = Literal["tempfail", "accept"]

# The SMTP reply Postfix/Sendmail give their client when we cannot classify (on_error = "tempfail").
TEMPFAIL_TEXT = "451 4.3.0 mailtriage: could not classify the message; try again later"
# Distinct forged X-Mailtriage-* names one message may carry before we stop trusting it: each costs
# memory until end of message (names are remembered to delete them). Real mail has none.
MAX_FORGED_NAMES = 100
MAX_FORGED_NAME = 200  # bytes; a longer X-Mailtriage-* name is an attack, not a header


@dataclass(frozen=True)
class Send:
    """Write these packets (none: the command wants no reply). ``note``: why, when it is a refusal."""

    packets: tuple[bytes, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Classify:
    """End of message: classify ``raw``, then answer with ``tagged(decision)`` or ``failed()``.

    ``raw`` is the header and the body as far as they fit in ``max_message_size`` (``truncated``:
    something was left out); ``size`` counts every header and body byte the MTA sent."""

    raw: bytes
    truncated: bool
    size: int


@dataclass(frozen=True)
class Close:
    reason: str


Outcome = Send | Classify | Close


class MilterSession:
    """The filter's side of one MTA connection. ``receive`` each command in order; a ProtocolError
    means: close the connection."""

    def __init__(self, max_message_size: int, on_error: OnError = "tempfail") -> None:
        if max_message_size <= 0:
            raise ValueError(f"max_message_size must be positive, got {max_message_size}")
        self.max_message_size = max_message_size
        self.on_error = on_error
        self.negotiated: p.OptNeg | None = None
        self.messages = 0  # messages that reached end of body on this connection
        self.peak_held = 0  # most message bytes held at once (tests check the bound)
        self._reset_message()

    # -- message state ----------------------------------------------------------------------------

    def _reset_message(self) -> None:
        self._headers: list[bytes] = []
        self._body: list[bytes] = []
        self._held = 0
        self._seen = 0
        self._truncated = False
        self._headers_full = False
        # lower-case name -> [name as first seen, occurrences]: what CHGHEADER must delete
        self._forged: dict[bytes, list[bytes | int]] = {}
        self._forged_overflow = False

    @property
    def held(self) -> int:
        return self._held

    def _hold(self, data: bytes) -> bool:
        if self._held + len(data) > self.max_message_size:
            self._truncated = True
            return False
        self._held += len(data)
        self.peak_held = max(self.peak_held, self._held)
        return True

    def _header(self, header: p.Header) -> None:
        line = header.name + b": " + header.value
        self._seen += len(line) + 2
        if is_mailtriage_header(header.name):
            self._note_forged(header.name)
        # Headers come first and in order: once one does not fit, later ones are left out too, so
        # what we classify is a true prefix of the message.
        if not self._headers_full and self._hold(line + b"\r\n"):
            self._headers.append(line)
        else:
            self._headers_full = True

    def _note_forged(self, name: bytes) -> None:
        key = name.lower()
        entry = self._forged.get(key)
        if entry is not None:
            entry[1] = int(entry[1]) + 1
        elif len(self._forged) >= MAX_FORGED_NAMES or len(name) > MAX_FORGED_NAME:
            self._forged_overflow = True
        else:
            self._forged[key] = [name, 1]

    def _body_chunk(self, chunk: bytes) -> bool:
        """Hold what fits; False once the limit is reached (the rest is not needed)."""
        self._seen += len(chunk)
        room = self.max_message_size - self._held
        if len(chunk) > room:
            chunk = chunk[:max(room, 0)]
            self._truncated = True
        if chunk:
            self._held += len(chunk)
            self.peak_held = max(self.peak_held, self._held)
            self._body.append(chunk)
        return not self._truncated

    def message_bytes(self) -> bytes:
        """The held message as RFC 5322 bytes: header lines (folds as CRLF), blank line, body prefix."""
        header = crlf(b"\r\n".join(self._headers) + b"\r\n") if self._headers else b""
        return header + b"\r\n" + b"".join(self._body)

    # -- commands ---------------------------------------------------------------------------------

    def receive(self, code: bytes, command: p.Command) -> Outcome:
        if self.negotiated is None:
            if not isinstance(command, p.OptNeg):
                raise p.ProtocolError(f"expected SMFIC_OPTNEG first, got command {code!r}")
            self.negotiated = p.negotiate(command)
            return Send((p.optneg(self.negotiated),))
        steps = self.negotiated.steps
        match command:
            case p.OptNeg():
                raise p.ProtocolError("SMFIC_OPTNEG again on a negotiated connection")
            case p.Quit():
                return Close("quit")
            case p.Abort() | p.QuitNewConnection():
                self._reset_message()
                return Send()
            case p.Header():
                self._header(command)
            case p.Body(chunk=chunk):
                wants_more = self._body_chunk(chunk)
                if not wants_more and steps & p.SMFIP_SKIP and p.expects_reply(code, steps):
                    return Send((p.reply(p.SMFIR_SKIP),))  # the MTA stops sending the body
            case p.EndOfBody(chunk=chunk):
                self._body_chunk(chunk)
                self.messages += 1
                if self._forged_overflow:
                    self._reset_message()
                    # Too many forged names to delete them all: tagging it would pass some on.
                    return Send((p.reply_code(TEMPFAIL_TEXT),), note="too many forged X-Mailtriage-* fields")
                return Classify(self.message_bytes(), self._truncated, self._seen)
        if p.expects_reply(code, steps):
            return Send((p.reply(p.SMFIR_CONTINUE),))
        return Send()

    # -- end of message ---------------------------------------------------------------------------

    def _deletions(self) -> list[bytes]:
        out: list[bytes] = []
        for name, count in self._forged.values():
            assert isinstance(name, bytes) and isinstance(count, int)
            # Highest index first: whether the MTA renumbers after a delete or not, the indexes
            # still to come are unchanged.
            out.extend(p.delete_header(i, name) for i in range(count, 0, -1))
        return out

    def tagged(self, decision: Decision, why: str | None = None) -> tuple[bytes, ...]:
        """The end-of-message answer for a classified message: forged fields deleted, ours on top,
        continue (the MTA delivers it). The body is never touched. ``why``: the opt-in
        X-Mailtriage-Why value, sent unfolded: a milter header value is one line (the protocol module
        refuses line breaks, as MTAs read them differently); it stays far below 998 characters."""
        assert self.negotiated is not None
        packets = self._deletions()
        for name, value in reversed(tag_fields(decision, why)):
            value = value.replace("\r\n ", " ")
            if self.negotiated.version >= 6:
                packets.append(p.insert_header(0, name, value))  # 0: on top, like the SMTP filter
            else:  # INSHEADER is not in every older MTA's vocabulary
                packets.append(p.add_header(name, value))
        packets.append(p.reply(p.SMFIR_CONTINUE))
        self._reset_message()
        return tuple(packets)

    def failed(self) -> tuple[bytes, ...]:
        """The end-of-message answer when classification failed or ran out of time: a 451 (the
        sender's MTA retries), or with on_error = "accept" the message unclassified - still
        without forged fields, which needs no model."""
        if self.on_error == "accept":
            packets = (*self._deletions(), p.reply(p.SMFIR_CONTINUE))
        else:
            packets = (p.reply_code(TEMPFAIL_TEXT),)
        self._reset_message()
        return packets

"""The next-hop SMTP client of the content filter: where a relayed message goes once it is tagged.

Blocking smtplib, called from worker threads. Nothing is held open at the next hop while a client
dawdles: ``check_recipient`` asks about one recipient on a short connection of its own (MAIL, RCPT,
QUIT), and ``deliver`` opens a new connection only once the message is complete and tagged, with
every wait cut to what is left of the relay's deadline. Every failure is a ``NextHopFailure``
carrying the next hop's reply code (None when it could not be reached) and the command it failed.
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

NEXT_HOP_TIMEOUT = 60.0  # seconds per next-hop command; a wedged next hop becomes a 451
# The reply to the message's final dot. A 451 after the next hop has queued the message would make
# the sender retry and deliver it twice, so wait long here; the transaction's deadline (the relay's
# ``[smtp] relay_timeout``) still bounds it, below the sender's own 10 minutes.
DATA_DONE_TIMEOUT = 600.0
_SEND_CHUNK = 1024 * 1024
_HEADER_ALLOWANCE = 256  # bytes our two headers add at most; added to a forwarded SIZE=
_MAX_REPLY_TEXT = 400


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
    """One connection to the next hop over smtplib (blocking: call it from a worker thread).

    ``deadline`` (``time.monotonic()``) bounds the whole transaction: every wait is cut to what is
    left of it, so the sender hears from us before its own timeout.
    """

    def __init__(self, hop: NextHop, deadline: float | None = None) -> None:
        self.hop = hop
        self.deadline = deadline
        self._smtp: smtplib.SMTP | None = None

    def _timeout(self, wanted: float, stage: str) -> float:
        if self.deadline is None:
            return wanted
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise NextHopFailure(None, "out of time for the next hop (smtp.relay_timeout)", stage)
        return min(wanted, left)

    def mail(self, sender: str, options: Sequence[str]) -> None:
        try:
            smtp = smtplib.SMTP(
                self.hop.host, self.hop.port, self.hop.local_hostname, timeout=self._timeout(self.hop.timeout, "MAIL")
            )
            self._smtp = smtp
            _no_delay(smtp)
            smtp.ehlo_or_helo_if_needed()
            self._set_timeout(self.hop.timeout, "MAIL")
            code, msg = smtp.mail(sender, forward_mail_options(options, smtp.has_extn))
        except NextHopFailure:
            raise
        except smtplib.SMTPResponseException as exc:
            raise NextHopFailure(exc.smtp_code, reply_text(exc.smtp_error), "MAIL") from exc
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, or an address smtplib cannot encode
            raise NextHopFailure(None, f"{type(exc).__name__}: {exc}", "MAIL") from exc
        if code != 250:
            raise NextHopFailure(code, reply_text(msg), "MAIL")

    def _set_timeout(self, wanted: float, stage: str) -> None:
        if self._smtp is not None and self._smtp.sock is not None:
            self._smtp.sock.settimeout(self._timeout(wanted, stage))

    def rcpt(self, recipient: str) -> None:
        def rcpt(smtp: smtplib.SMTP) -> tuple[int, bytes]:
            self._set_timeout(self.hop.timeout, "RCPT")
            return smtp.rcpt(recipient)

        code, msg = self._call(rcpt, "RCPT")
        if code not in (250, 251):
            raise NextHopFailure(code, reply_text(msg), "RCPT")

    def data(self, message: bytes | Sequence[bytes | memoryview]) -> str:
        """Send the message (bytes, or pieces sent one after the other with no copy of the whole);
        returns the next hop's 250 text (it usually names its queue id)."""
        parts = [message] if isinstance(message, (bytes, bytearray, memoryview)) else list(message)

        def send(smtp: smtplib.SMTP) -> tuple[int, bytes]:
            self._set_timeout(self.hop.timeout, "DATA")
            code, repl = smtp.docmd("DATA")
            if code != 354:
                raise smtplib.SMTPDataError(code, repl)
            # sendall's timeout bounds the whole call (Python >= 3.5): a next hop that reads slowly
            # cannot stretch the transaction past the deadline.
            self._set_timeout(self.hop.data_timeout, "DATA")
            for chunk in data_stream(parts):
                smtp.send(chunk)
            # The reply to the final dot may take long (RFC 5321 §4.5.3.2.6): up to data_timeout,
            # within what is left of the deadline.
            self._set_timeout(max(self.hop.timeout, self.hop.data_timeout), "DATA")
            return smtp.getreply()

        code, msg = self._call(send, "DATA")
        if code != 250:
            raise NextHopFailure(code, reply_text(msg), "DATA")
        return reply_text(msg)

    def _call(self, op: Callable[[smtplib.SMTP], tuple[int, bytes]], stage: str) -> tuple[int, bytes]:
        if self._smtp is None:
            raise NextHopFailure(None, "the connection to the next hop is closed", stage)
        try:
            return op(self._smtp)
        except NextHopFailure:
            raise
        except smtplib.SMTPResponseException as exc:  # e.g. SMTPDataError: DATA refused
            raise NextHopFailure(exc.smtp_code, reply_text(exc.smtp_error), stage) from exc
        except Exception as exc:  # noqa: BLE001 - whatever it was, the next hop did not accept
            raise NextHopFailure(None, f"{type(exc).__name__}: {exc}", stage) from exc

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.sock is not None:
                smtp.sock.settimeout(min(self.hop.timeout, 10.0))  # QUIT is a courtesy: never wait long
            smtp.quit()  # an unfinished transaction is abandoned: the next hop discards it
        except (OSError, smtplib.SMTPException):
            smtp.close()


_LINE_START_DOT = re.compile(rb"(?m)^\.")


def data_stream(parts: Sequence[bytes | memoryview], chunk_size: int = _SEND_CHUNK) -> Iterator[bytes]:
    """The DATA bytes for a CRLF message given in pieces: dot-stuffed, ending in CRLF "." CRLF,
    at most ``chunk_size`` bytes of the message copied at a time (smtplib's ``data`` makes three
    copies of the whole message)."""
    tail = b""  # the last two bytes so far: a chunk may end between CR and LF, or mid-line
    for part in parts:
        view = memoryview(part)
        for i in range(0, len(view), chunk_size):
            chunk = bytes(view[i : i + chunk_size])
            yield _dot_stuffed(chunk, at_line_start=tail == b"" or tail.endswith(b"\n"))
            tail = (tail + chunk[-2:])[-2:]
    yield (b"" if tail == b"\r\n" else b"\r\n") + b".\r\n"


def _dot_stuffed(chunk: bytes, at_line_start: bool) -> bytes:
    # RFC 5321 §4.5.2 for one piece of a CRLF message; the piece may start mid-line.
    out = _LINE_START_DOT.sub(b"..", chunk)
    if not at_line_start and chunk[:1] == b".":
        out = out[1:]
    return out


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


def deliver(
    hop: NextHop,
    sender: str,
    options: Sequence[str],
    recipients: Sequence[str],
    message: bytes | Sequence[bytes | memoryview],
    deadline: float | None = None,
) -> str:
    """Relay the complete message on a new connection (blocking); returns the next hop's 250 text.

    A recipient refused now, after the next hop accepted it at RCPT, aborts the transaction before
    DATA (nothing delivered to anyone) with a temporary failure: one reply to DATA cannot refuse
    one recipient, and the retry's RCPT check will carry the next hop's verdict for it.
    """
    tx = NextHopTransaction(hop, deadline)
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


def _no_delay(smtp: smtplib.SMTP) -> None:
    # smtplib writes the message and then the final dot (and each command) as separate small
    # writes; with Nagle's algorithm each waited for the ACK of the one before, which the next
    # hop delays by ~40 ms: two or three such waits on every relayed message.
    sock = smtp.sock
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

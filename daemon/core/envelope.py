"""Subject, sender and date of a message, as the console shows and searches them.

The decision row keys a message by its Message-ID; a person looks for it by who sent it and what it
was about. Pure: the header block in, bounded display strings out (RFC 2047 decoded, control
characters removed), never an exception, whatever the mail holds.
"""

from __future__ import annotations

import email.header
import re
from dataclasses import dataclass

# Enough for any real subject or address; a 10k-character header must not bloat the state database.
MAX_CHARS = 300
# Only the header block is parsed: a message's body never costs anything here.
_HEAD_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Envelope:
    subject: str
    sender: str
    date: str  # as the Date field says it, "" when missing


def _clean(value: str) -> str:
    text = _CONTROL.sub("", " ".join(value.split()))
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "\u2026"


def _decoded(raw: str | None) -> str:
    if not raw:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except Exception:  # noqa: BLE001 - broken encoded-words: show the field as it came
        return raw


_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*)$", re.DOTALL)
_WANTED = {b"subject": "subject", b"from": "sender", b"date": "date"}


def envelope_of(raw: bytes) -> Envelope:
    """The message's first Subject, From and Date, decoded and bounded.

    Read line by line rather than with the email package's parser, which stops at the first
    malformed line (``X-Foo : bar``, a bare word) and would then see no Subject at all, although the
    mail client shows one."""
    head = raw[:_HEAD_BYTES]
    end = re.search(rb"\r?\n\r?\n", head)
    head = head[: end.start()] if end else head
    found: dict[str, bytes] = {}
    current: str | None = None
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field before
            if current is not None and current in found and len(found[current]) < _HEAD_BYTES:
                found[current] += b" " + line.strip()
            continue
        match = _FIELD.match(line)
        current = _WANTED.get(match.group(1).lower()) if match else None
        if current is not None and current in found:
            current = None  # the first one counts, as for the mail client
        elif current is not None and match:
            found[current] = match.group(2).strip()
    values = {k: _decoded(v.decode("utf-8", errors="replace")) for k, v in found.items()}
    return Envelope(_clean(values.get("subject", "")), _clean(values.get("sender", "")), _clean(values.get("date", "")))

"""Subject, sender and date of a message, as the console shows and searches them.

The decision row keys a message by its Message-ID; a person looks for it by who sent it and what it
was about. Pure: the header block in, bounded display strings out (RFC 2047 decoded, control
characters removed), never an exception, whatever the mail holds.
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import email.utils
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


def envelope_of(raw: bytes) -> Envelope:
    """The message's Subject, From and Date, decoded and bounded."""
    head = raw[:_HEAD_BYTES]
    end = re.search(rb"\r?\n\r?\n", head)
    head = head[: end.start()] if end else head
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
        return Envelope(_clean(_decoded(msg.get("Subject"))), _clean(_decoded(msg.get("From"))),
                        _clean(str(msg.get("Date") or "")))
    except Exception:  # noqa: BLE001 - hostile headers: nothing to show rather than a failed decision
        return Envelope("", "", "")

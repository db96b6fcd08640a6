"""The X-Mailtriage-* header tagging both action paths share: pure, bytes in, bytes out.

Used by the SMTP content filter (``mailtriage.smtp.relay``) and the IMAP header rewrite
(``mailtriage.imap.actions``). Header bytes stay bytes: no re-serialisation through ``email``, so
a tagged copy is the original plus two lines.
"""

from __future__ import annotations

import hashlib
import re

from mailtriage.core.routing import Decision

CATEGORY_HEADER = "X-Mailtriage-Category"
CONFIDENCE_HEADER = "X-Mailtriage-Confidence"
UNSURE = "unsure"

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_ATOM_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def safe_atom(value: str) -> str:
    """``value`` with everything but letters, digits, ``_ . -`` replaced by ``_`` (a header token, an IMAP keyword)."""
    return _ATOM_UNSAFE.sub("_", value)


def split_header(raw: bytes) -> tuple[bytes, bytes]:
    """(header block without its terminating blank line, rest from the blank line on)."""
    found = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i != -1]
    if not found:
        return raw, b""
    idx = min(found)
    return raw[:idx], raw[idx:]


def _newline(header: bytes) -> bytes:
    return b"\r\n" if b"\r\n" in header else b"\n"


def strip_mailtriage_headers(raw: bytes) -> bytes:
    """Drop every X-Mailtriage-* field (with its folded lines) from the header block.

    A sender could otherwise forge a category; only the daemon writes these headers.
    """
    header, rest = split_header(raw)
    nl = _newline(header)
    kept: list[bytes] = []
    dropping = False
    for line in header.split(nl):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        m = _HEADER_NAME.match(line)
        dropping = bool(m and m.group(1).lower().startswith(b"x-mailtriage-"))
        if not dropping:
            kept.append(line)
    return nl.join(kept) + rest


def category_value(decision: Decision) -> str:
    # An unsure message is labelled "unsure", never with the guess: header rules downstream must
    # not file a guess (the guess is still in the state database).
    return UNSURE if decision.unsure else decision.label


def add_headers(raw: bytes, decision: Decision) -> bytes:
    """The message with X-Mailtriage-Category/-Confidence on top and any sender-supplied ones removed."""
    clean = strip_mailtriage_headers(raw)
    nl = _newline(split_header(clean)[0])
    value = safe_atom(category_value(decision))
    top = f"{CATEGORY_HEADER}: {value}".encode() + nl + f"{CONFIDENCE_HEADER}: {decision.confidence:.4f}".encode() + nl
    return top + clean


def header_fingerprint(raw_or_header: bytes) -> str:
    """Identity of a message's header block that survives COPY and our APPEND: X-Mailtriage-*
    fields dropped, line endings and trailing blanks normalised (servers may turn LF into CRLF)."""
    header, _rest = split_header(strip_mailtriage_headers(raw_or_header))
    lines = [ln.rstrip() for ln in header.replace(b"\r\n", b"\n").split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    return hashlib.sha256(b"\n".join(lines)).hexdigest()

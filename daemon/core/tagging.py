"""The X-Mailtriage-* header tagging both action paths share: pure, bytes in, bytes out.

Used by the SMTP content filter (``mailtriage.smtp.relay``), the IMAP header rewrite
(``mailtriage.imap.actions``) and the milter (``mailtriage.milter``, which sends the same fields as
milter header edits). Header bytes stay bytes: no re-serialisation through ``email``, so
a tagged copy is the original with CRLF line endings, minus forged X-Mailtriage-* lines, plus two
(three with the opt-in X-Mailtriage-Why).
"""

from __future__ import annotations

import hashlib
import re

from mailtriage.core.routing import Decision

CATEGORY_HEADER = "X-Mailtriage-Category"
CONFIDENCE_HEADER = "X-Mailtriage-Confidence"
# Opt-in (config why_header): a one-line summary of the decision's explanation (core.explain.why_header).
WHY_HEADER = "X-Mailtriage-Why"
UNSURE = "unsure"

# Bytes a header name may not hold (controls, space, DEL, 8-bit): removed before deciding whether a
# field is ours, because readers disagree on them. Python's email parser ends the header at
# "X-Mailtriage-Category\0: x" while Dovecot drops the NUL and reads a second category field.
_NOT_NAME_BYTES = bytes(range(0x21)) + bytes(range(0x7F, 0x100))
_OURS = b"x-mailtriage"
_EOL = re.compile(rb"\r\n|\r|\n")
_ATOM_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def safe_atom(value: str) -> str:
    """``value`` with everything but letters, digits, ``_ . -`` replaced by ``_`` (a header token, an IMAP keyword)."""
    return _ATOM_UNSAFE.sub("_", value)


def crlf(raw: bytes) -> bytes:
    """Every line ending (CRLF, bare LF, bare CR) as CRLF.

    SMTP allows only CRLF (RFC 5321 §2.3.8), but MTAs and mail parsers disagree on what a bare LF or
    bare CR means: one reads a line break where another reads none, so a forged header can hide
    from the stripping below, and ``\r.\r\n`` can end DATA at a next hop that takes a bare CR as a
    line end (SMTP smuggling). Normalised first, every reader sees the same lines and dot-stuffing
    covers every line.
    """
    crlfs = raw.count(b"\r\n")
    if raw.count(b"\n") == crlfs and raw.count(b"\r") == crlfs:
        return raw
    return _EOL.sub(b"\r\n", raw)


def _header_end(raw: bytes) -> int:
    """Where the blank line that ends the header block starts (CRLF endings; 0: no header)."""
    if raw.startswith(b"\r\n"):
        return 0
    idx = raw.find(b"\r\n\r\n")
    return len(raw) if idx == -1 else idx


def split_header(raw: bytes) -> tuple[bytes, bytes]:
    """(header block without its terminating blank line, rest from the blank line on) of a message
    with CRLF line endings (see ``crlf``). A message that starts with a blank line has no header."""
    end = _header_end(raw)
    return raw[:end], raw[end:]


def _kept_lines(header: bytes) -> list[bytes]:
    kept: list[bytes] = []
    dropping = True  # a continuation before any field name is an orphan
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = is_mailtriage_field(line)
        if not dropping:
            kept.append(line)
    return kept


def _stripped_parts(raw: bytes) -> tuple[bytes, memoryview]:
    # (the header block kept, the rest of the CRLF message as a view: no copy of the body)
    raw = crlf(raw)
    end = _header_end(raw)
    kept = _kept_lines(raw[:end])
    if not kept:  # nothing left of the header: the message starts with its blank line
        return b"", memoryview(raw)[end + 2 :]
    return b"\r\n".join(kept), memoryview(raw)[end:]


def strip_mailtriage_headers(raw: bytes) -> bytes:
    """The message with CRLF line endings and without any X-Mailtriage-* field (with its folded lines).

    A sender could otherwise forge a category; only the daemon writes these headers. Folded lines
    at the very top belong to no field: they are dropped too, or they would fold into the header
    we put on top.
    """
    head, rest = _stripped_parts(raw)
    return head + rest


def is_mailtriage_field(line: bytes) -> bool:
    """Whether a header line (not a continuation) could be read as an X-Mailtriage-* field by any reader.

    The name is everything up to the first colon (the whole line when there is none), with every
    byte that cannot be part of a field name removed; what then starts with ``x-mailtriage`` in
    any case is ours to strip. Stripping a strange field too many is harmless; one too few lets a
    sender pick the folder.
    """
    name = line.split(b":", 1)[0].translate(None, _NOT_NAME_BYTES)
    return name[: len(_OURS)].lower() == _OURS


def is_mailtriage_header(name: bytes) -> bool:
    """Whether a field name is one of ours (any X-Mailtriage-*, any case, bytes no name may hold
    ignored, as ``is_mailtriage_field`` reads them): only the daemon writes them."""
    return is_mailtriage_field(name.split(b":", 1)[0])


def category_value(decision: Decision) -> str:
    # An unsure message is labelled "unsure", never with the guess: header rules downstream must
    # not file a guess (the guess is still in the state database).
    return UNSURE if decision.unsure else decision.label


def tag_fields(decision: Decision, why: str | None = None) -> list[tuple[str, str]]:
    """Our fields in the order they stand on top of a tagged message: (name, value), values ASCII.

    ``why``: the X-Mailtriage-Why value (``core.explain.why_header``: ASCII, folded with CRLF +
    space), added only when given; None leaves the message as without the option."""
    fields = [(CATEGORY_HEADER, safe_atom(category_value(decision))), (CONFIDENCE_HEADER, f"{decision.confidence:.4f}")]
    if why:
        fields.append((WHY_HEADER, why))
    return fields


def tagged_parts(raw: bytes, decision: Decision, why: str | None = None) -> tuple[bytes, memoryview]:
    """``add_headers`` in two pieces, (new header block, the rest of ``raw`` as a view), so that a
    large message is sent on without a second copy of its body in memory."""
    head, rest = _stripped_parts(raw)
    top = "".join(f"{name}: {value}\r\n" for name, value in tag_fields(decision, why)).encode("ascii")
    return top + head, rest  # with no header of its own, rest starts with the blank line


def add_headers(raw: bytes, decision: Decision, why: str | None = None) -> bytes:
    """The message (CRLF line endings) with X-Mailtriage-Category/-Confidence (and, given ``why``,
    X-Mailtriage-Why) on top, each ending in CRLF, and any sender-supplied X-Mailtriage-* removed."""
    head, rest = tagged_parts(raw, decision, why)
    return head + rest


def header_fingerprint(raw_or_header: bytes) -> str:
    """Identity of a message's header block that survives COPY and our APPEND: X-Mailtriage-*
    fields dropped, line endings and trailing blanks normalised (servers may turn LF into CRLF)."""
    header, _rest = split_header(strip_mailtriage_headers(raw_or_header))
    lines = [ln.rstrip() for ln in header.split(b"\r\n")]
    while lines and not lines[-1]:
        lines.pop()
    return hashlib.sha256(b"\n".join(lines)).hexdigest()

"""The X-Mailtriage-* header tagging shared by the SMTP filter and the IMAP header rewrite (pure)."""

from __future__ import annotations

import pytest

from mailtriage.core import tagging
from mailtriage.core.routing import Decision

pure = pytest.mark.pure

BILLING = Decision("billing", 0.8765, False, "Support/Billing")
UNSURE = Decision("login", 0.31, True, "Support/Unsure")

RAW = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: support@example.com\r\n"
    b"X-Mailtriage-Category: refunds\r\n"
    b"Subject: Invoice 42\r\n"
    b"x-mailtriage-confidence: 1.0\r\n"
    b"  folded forged line\r\n"
    b"Message-ID: <inv-42@example.com>\r\n"
    b"\r\n"
    b"X-Mailtriage-Category: body text stays\r\n"
)


@pure
def test_add_headers_on_top_and_forged_ones_removed() -> None:
    out = tagging.add_headers(RAW, BILLING)
    header, body = tagging.split_header(out)
    lines = header.split(b"\r\n")
    assert lines[0] == b"X-Mailtriage-Category: billing"
    assert lines[1] == b"X-Mailtriage-Confidence: 0.8765"
    assert b"refunds" not in header and b"folded forged" not in header and b"1.0" not in header
    assert body == b"\r\n\r\nX-Mailtriage-Category: body text stays\r\n"  # the body is never touched
    assert b"Subject: Invoice 42" in header and b"Message-ID: <inv-42@example.com>" in header


@pure
def test_add_headers_keeps_bare_lf_and_says_unsure() -> None:
    raw = b"From: a@x\nSubject: s\n\nbody\n"
    out = tagging.add_headers(raw, UNSURE)
    assert out == b"X-Mailtriage-Category: unsure\nX-Mailtriage-Confidence: 0.3100\nFrom: a@x\nSubject: s\n\nbody\n"


@pure
def test_fingerprint_survives_our_headers_and_crlf() -> None:
    fp = tagging.header_fingerprint(RAW)
    assert tagging.header_fingerprint(tagging.add_headers(RAW, BILLING)) == fp
    assert tagging.header_fingerprint(RAW.replace(b"\r\n", b"\n")) == fp
    header_only = tagging.split_header(RAW)[0] + b"\r\n\r\n"
    assert tagging.header_fingerprint(header_only) == fp
    assert tagging.header_fingerprint(RAW.replace(b"Invoice 42", b"Invoice 43")) != fp

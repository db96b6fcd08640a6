"""The subject, sender and date the console shows and searches: decoded, bounded, never an exception."""

from __future__ import annotations

import pytest

from mailtriage.core.envelope import MAX_CHARS, Envelope, envelope_of

pytestmark = pytest.mark.pure


@pytest.mark.parametrize(("raw", "expected"), [
    (b"Subject: =?utf-8?q?caf=C3=A9?= bill\r\nFrom: Ann <a@example.com>\r\nDate: Mon, 1 Jan 2026\r\n\r\nbody",
     Envelope("caf\u00e9 bill", "Ann <a@example.com>", "Mon, 1 Jan 2026")),
    # A malformed field before the subject does not hide it (the email package's parser stops there).
    (b"X-Forged : x\r\nSubject: help\r\nFrom: b@example.com\r\n\r\n", Envelope("help", "b@example.com", "")),
    (b"Subject: folded\r\n  subject\r\nSubject: second\r\n\r\nSubject: in the body", Envelope("folded subject", "", "")),
    ("Subject: a\x00b\x1b[31m\u202e\r\n\r\n".encode(), Envelope("ab[31m", "", "")),
    (b"Subject: =?bogus?x?zz?=\r\n\r\n", Envelope("=?bogus?x?zz?=", "", "")),
    (b"no header at all", Envelope("", "", "")),
    (b"", Envelope("", "", "")),
])
def test_envelope_of(raw: bytes, expected: Envelope) -> None:
    assert envelope_of(raw) == expected


def test_long_and_huge_headers_are_bounded() -> None:
    subject = envelope_of(b"Subject: " + b"x" * 100_000 + b"\r\n\r\n").subject
    assert len(subject) == MAX_CHARS and subject.endswith("\u2026")
    many = b"".join(b"X-%d: y\r\n" % i for i in range(10_000)) + b"Subject: late\r\n\r\n"
    assert envelope_of(many).subject in ("", "late")  # past the 64 KiB header budget: not read, no error

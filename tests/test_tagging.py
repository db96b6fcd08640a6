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
def test_add_headers_end_in_crlf_and_say_unsure() -> None:
    # SMTP wants CRLF; a bare-LF message used to get bare-LF headers of ours.
    raw = b"From: a@x\nSubject: s\n\nbody\n"
    out = tagging.add_headers(raw, UNSURE)
    assert out == b"X-Mailtriage-Category: unsure\r\nX-Mailtriage-Confidence: 0.3100\r\nFrom: a@x\r\nSubject: s\r\n\r\nbody\r\n"
    one_header = tagging.add_headers(b"Subject: s\r\n\r\nbody\r\n", BILLING)  # no CRLF inside the header block
    assert one_header == b"X-Mailtriage-Category: billing\r\nX-Mailtriage-Confidence: 0.8765\r\nSubject: s\r\n\r\nbody\r\n"
    no_header = tagging.add_headers(b"\r\nX-Mailtriage-Category: body\r\n", BILLING)
    assert no_header == b"X-Mailtriage-Category: billing\r\nX-Mailtriage-Confidence: 0.8765\r\n\r\nX-Mailtriage-Category: body\r\n"


FORGERIES = {
    # a forged field hidden behind a bare LF / bare CR in a CRLF header block
    "bare-lf": b"From: a@x\r\nSubject: s\nX-Mailtriage-Category: refunds\r\nTo: b@x\r\n\r\nbody\r\n",
    "bare-cr": b"From: a@x\r\nSubject: s\rX-Mailtriage-Category: refunds\r\nTo: b@x\r\n\r\nbody\r\n",
    "lf-message-cr": b"From: a@x\nSubject: s\rX-Mailtriage-Category: refunds\nTo: b@x\n\nbody\n",
    "mixed-folded": b"From: a@x\r\nSubject: s\nx-mailtriage-confidence: 1.0\r\n\tfolded\rTo: b@x\r\n\r\nbody\r\n",
    # a first line starting with whitespace would fold into our header on top
    "leading-fold": b" refunds\r\n\tX-Forged: yes\r\nFrom: a@x\r\nSubject: s\r\nTo: b@x\r\n\r\nbody\r\n",
}


@pure
@pytest.mark.parametrize("raw", list(FORGERIES.values()), ids=list(FORGERIES))
def test_no_forged_header_survives_any_line_ending(raw: bytes) -> None:
    import email
    import email.policy
    import re

    out = tagging.add_headers(raw, BILLING)
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", out)  # CRLF only: every parser sees the same lines
    for policy in (email.policy.compat32, email.policy.default):
        msg = email.message_from_bytes(out, policy=policy)
        assert msg.get_all("X-Mailtriage-Category") == ["billing"]
        assert msg.get_all("X-Mailtriage-Confidence") == ["0.8765"]
        assert msg["From"] == "a@x" and msg["To"] == "b@x"
    assert b"refunds" not in out and b"folded" not in out and b"X-Forged" not in out and b"1.0\r" not in out
    assert out.endswith(b"\r\n\r\nbody\r\n")


@pure
def test_crlf_normalises_every_line_ending() -> None:
    assert tagging.crlf(b"a\r\nb\nc\rd\r\r\ne") == b"a\r\nb\r\nc\r\nd\r\n\r\ne"
    same = b"a\r\nb\r\n"
    assert tagging.crlf(same) is same
    assert tagging.crlf(b"x\r.\r\nMAIL FROM:<e@x>\r\n") == b"x\r\n.\r\nMAIL FROM:<e@x>\r\n"


@pure
def test_fingerprint_survives_our_headers_and_crlf() -> None:
    fp = tagging.header_fingerprint(RAW)
    assert tagging.header_fingerprint(tagging.add_headers(RAW, BILLING)) == fp
    assert tagging.header_fingerprint(RAW.replace(b"\r\n", b"\n")) == fp
    header_only = tagging.split_header(RAW)[0] + b"\r\n\r\n"
    assert tagging.header_fingerprint(header_only) == fp
    assert tagging.header_fingerprint(RAW.replace(b"Invoice 42", b"Invoice 43")) != fp
    # The copy we APPEND is normalised (CRLF, orphan folds dropped): the original still matches it.
    odd = b" orphan fold\r\nFrom: a@x\rSubject: s\n\nbody"
    assert tagging.header_fingerprint(tagging.add_headers(odd, BILLING)) == tagging.header_fingerprint(odd)


@pure
@pytest.mark.parametrize(
    "line",
    [b"X-Mailtriage-Category\x00: refunds", b"\x00X-Mailtriage-Category: refunds", b"X-Mail\x00triage-Category: x",
     b"X-Mailtriage-Category\x0b : refunds", b"X-MAILTRIAGE-CATEGORY\x7f: x", b"X-Mailtriage-Category \x00\t: x",
     b"X-Mailtriage-Category\xc2\xa0: x", b"X-Mailtriage-Category"],
    ids=["nul-before-colon", "nul-first", "nul-inside", "vt-space", "del", "blank-nul-tab", "nbsp", "no-colon"],
)
def test_names_with_nul_controls_or_blanks_are_stripped_too(line: bytes) -> None:
    # Dovecot drops the NUL and reads a second X-Mailtriage-Category; Python's parser does not even
    # see the field. Stripping on "is it a well-formed name" missed it; what any reader could take
    # for ours is stripped.
    raw = b"From: a@x\r\n" + line + b"\r\n\tfolded\r\nSubject: s\r\n\r\nbody\r\n"
    out = tagging.add_headers(raw, BILLING)
    assert out == b"X-Mailtriage-Category: billing\r\nX-Mailtriage-Confidence: 0.8765\r\nFrom: a@x\r\nSubject: s\r\n\r\nbody\r\n"


@pure
def test_every_byte_in_a_forged_name_leaves_no_category_but_ours() -> None:
    from mailtriage.testing.smtp_fuzz import fuzz_header_names

    report = fuzz_header_names()
    assert report.inputs == 256 * 8
    assert report.failures == []

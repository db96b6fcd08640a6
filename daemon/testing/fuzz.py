"""Seeded generator of hostile mail for fuzzing (tests and ``benchmarks.fuzz_mailtext``).

``hostile_messages(seed, n)`` yields ``n`` byte strings: well-formed seeds (plain, multipart with
HTML, nested attachments, quoted-printable and base64, encoded-word headers, odd charsets, an
embedded message/rfc822, mbox ``From `` lines) put through 1-4 random mutations (byte flips,
inserted junk and control bytes, cut, repeated or swapped slices, broken boundaries, deep MIME
nesting, huge header lines and header counts, HTML bombs, bogus charsets and transfer encodings).
The same seed gives the same inputs, so a failure found in a long run can be replayed by index.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Iterator

CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "shift_jis", "koi8-r", "gb2312", "utf-16", "utf-7",
            "x-unknown", "unicode-escape", "idna", "", "utf-8\x00", "ascii; foo", "\xff\xfe"]

_WORDS = ["invoice", "refund", "password", "login", "billing", "order", "help", "urgent", "déjà", "данные",
          "請求", "😀", "re:", "fwd:", ">", "--", "=?", "?=", "<html>", "&amp;", "\t", "\u202e"]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _plain(rng: random.Random) -> bytes:
    cs = rng.choice(CHARSETS[:6])
    body = _text(rng, rng.randint(0, 300)).encode(cs, "replace")
    return (b"From: a@example.com\r\nTo: support@example.com\r\nSubject: " + _text(rng, 5).encode("utf-8")
            + b"\r\nMessage-ID: <" + str(rng.random()).encode() + b"@x>\r\nContent-Type: text/plain; charset="
            + cs.encode() + b"\r\n\r\n" + body + b"\r\n")


def _multipart(rng: random.Random) -> bytes:
    b1 = f"b{rng.randint(0, 10**6)}".encode()
    html = ("<html><body>" + "<div>" * rng.randint(0, 50) + _text(rng, 40) + "</div>" * rng.randint(0, 50)
            + "<script>x</script><style>y</style></body></html>").encode()
    qp = b"=E2=82=AC caf=C3=A9 =\r\nsoft break " + _text(rng, 20).encode()
    att = base64.encodebytes(rng.randbytes(rng.randint(0, 3000)))
    return (b"From: =?utf-8?B?" + base64.b64encode(_text(rng, 3).encode()) + b"?= <c@example.com>\r\n"
            b"Subject: =?iso-8859-1?Q?caf=E9_" + _text(rng, 2).encode("ascii", "replace") + b"?=\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"" + b1 + b"\"\r\n\r\n"
            b"preamble\r\n--" + b1 + b"\r\nContent-Type: multipart/alternative; boundary=alt" + b1 + b"\r\n\r\n"
            b"--alt" + b1 + b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
            b"quoted-printable\r\n\r\n" + qp + b"\r\n--alt" + b1 + b"\r\nContent-Type: text/html\r\n\r\n" + html
            + b"\r\n--alt" + b1 + b"--\r\n--" + b1 + b"\r\nContent-Type: application/pdf; name=x.pdf\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment\r\n\r\n" + att
            + b"\r\n--" + b1 + b"\r\nContent-Type: message/rfc822\r\n\r\n" + _plain(rng) + b"\r\n--" + b1 + b"--\r\n")


def _mbox(rng: random.Random) -> bytes:
    return b"From someone@example.com Mon Jan  1 00:00:00 2024\n" + _plain(rng).replace(b"\r\n", b"\n")


SEEDS: list[Callable[[random.Random], bytes]] = [_plain, _multipart, _mbox]


def _flip(rng: random.Random, m: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 20)):
        if m:
            m[rng.randrange(len(m))] = rng.randrange(256)
    return m


def _insert(rng: random.Random, m: bytearray) -> bytearray:
    junk = rng.choice([b"\x00", b"\r", b"\n", b"\r\n\r\n", b"\x1b[31m", b"=?", b"?=", b"--", b"\xff\xfe",
                       b"Content-Type: multipart/mixed; boundary=zz\r\n", b"\r\n--zz\r\n", b"<", b">",
                       b"Content-Transfer-Encoding: base64\r\n", rng.randbytes(rng.randint(1, 64))])
    at = rng.randint(0, len(m))
    return m[:at] + junk * rng.randint(1, 50) + m[at:]


def _cut(rng: random.Random, m: bytearray) -> bytearray:
    return m[: rng.randint(0, len(m))]


def _repeat(rng: random.Random, m: bytearray) -> bytearray:
    if not m:
        return m
    a = rng.randrange(len(m))
    b = min(len(m), a + rng.randint(1, 200))
    return m[:a] + m[a:b] * rng.randint(2, 200) + m[b:]


def _swap(rng: random.Random, m: bytearray) -> bytearray:
    if len(m) < 4:
        return m
    a, b = sorted(rng.sample(range(len(m)), 2))
    return m[b:] + m[a:b] + m[:a]


def _deep(rng: random.Random, m: bytearray) -> bytearray:
    depth = rng.randint(20, 300)
    head = b"".join(b"Content-Type: multipart/mixed; boundary=d%d\r\n\r\n--d%d\r\n" % (i, i) for i in range(depth))
    return bytearray(b"Subject: deep\r\n" + head + bytes(m))


def _long_header(rng: random.Random, m: bytearray) -> bytearray:
    name = rng.choice([b"Subject", b"From", b"X-Junk", b"Content-Type", b"Message-ID"])
    value = rng.choice([b"a", b" =?utf-8?q?", b"\t", b";x=", b"(", b"\""]) * rng.randint(100, 20_000)
    return bytearray(name + b": " + value + b"\r\n" + bytes(m))


def _many_headers(rng: random.Random, m: bytearray) -> bytearray:
    return bytearray(b"X-H: v\r\n" * rng.randint(100, 5_000) + bytes(m))


def _html_bomb(rng: random.Random, m: bytearray) -> bytearray:
    tag = rng.choice([b"<div>", b"<table><tr><td>", b"<!--", b"<b", b"&#", b"<br>", b"<p>"])
    return bytearray(b"Subject: bomb\r\nContent-Type: text/html\r\n\r\n" + tag * rng.randint(100, 10_000) + bytes(m))


def _charset(rng: random.Random, m: bytearray) -> bytearray:
    return bytearray(bytes(m).replace(b"charset=", b"charset=" + rng.choice(CHARSETS).encode("latin-1", "replace"), 1))


def _encoding(rng: random.Random, m: bytearray) -> bytearray:
    enc = rng.choice([b"base64", b"quoted-printable", b"x-uuencode", b"7bit", b"binary", b"bogus"])
    return bytearray(b"Content-Transfer-Encoding: " + enc + b"\r\n" + bytes(m))


MUTATIONS: list[Callable[[random.Random, bytearray], bytearray]] = [
    _flip, _insert, _cut, _repeat, _swap, _deep, _long_header, _many_headers, _html_bomb, _charset, _encoding,
]


def hostile_message(seed: int, index: int) -> bytes:
    """Input number ``index`` of the stream for ``seed`` (replayable on its own)."""
    rng = random.Random(seed * 1_000_003 + index)
    m = bytearray(rng.choice(SEEDS)(rng))
    for _ in range(rng.randint(1, 4)):
        m = rng.choice(MUTATIONS)(rng, m)
    return bytes(m)


def hostile_messages(seed: int, n: int) -> Iterator[bytes]:
    for i in range(n):
        yield hostile_message(seed, i)


class _EventCounter:
    """Stands in for mailtext's logger during a run: counts the fallbacks its guards log."""

    def __init__(self) -> None:
        self.events: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def warning(self, event: str, **kw: object) -> None:
        self.events[event] = self.events.get(event, 0) + 1
        self.first.setdefault(event, str(kw.get("error", "")))

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def run_mailtext_fuzz(seed: int, n: int, on_input: Callable[[int], None] | None = None) -> dict[str, object]:
    """Feed ``n`` hostile inputs to mail_text, message_key, content_fingerprint, message_date and
    message_headers.

    All five are documented never to raise; they guard their work with a fallback that logs
    ``*_fallback``. A fallback is a bug the guard caught, so it is counted (with the first input
    index and error) as a failure, as are exceptions, non-str results, text over ``max_chars`` and
    a second call that differs. Returns counts and the slowest input's time (for the benchmark;
    tests never assert on time).
    """
    import time

    from mailtriage.core import mailtext

    counter = _EventCounter()
    saved = mailtext.log
    mailtext.log = counter  # type: ignore[assignment]
    failures: list[dict[str, object]] = []
    times: list[float] = []
    total_bytes = 0
    try:
        for i in range(n):
            raw = hostile_message(seed, i)
            total_bytes += len(raw)
            before = dict(counter.events)
            t0 = time.perf_counter()
            try:
                text = mailtext.mail_text(raw)
                key = mailtext.message_key(raw)
                content = mailtext.content_fingerprint(raw)
                mailtext.message_date(raw)
                mailtext.message_headers(raw)
            except Exception as exc:  # noqa: BLE001 - exactly what the fuzz looks for
                failures.append({"index": i, "problem": f"raised {exc!r}"[:300]})
                continue
            times.append(time.perf_counter() - t0)
            if not isinstance(text, str) or len(text) > 2000:
                failures.append({"index": i, "problem": f"mail_text returned {type(text).__name__} of length {len(text)}"})
            if not isinstance(key, str) or not key:
                failures.append({"index": i, "problem": f"message_key returned {key!r}"})
            if not isinstance(content, str) or not content.startswith("sha256:"):
                failures.append({"index": i, "problem": f"content_fingerprint returned {content!r}"})
            elif i % 10 == 0 and mailtext.content_fingerprint(raw) != content:
                failures.append({"index": i, "problem": "content_fingerprint is not deterministic"})
            if i % 10 == 0 and mailtext.mail_text(raw) != text:
                failures.append({"index": i, "problem": "mail_text is not deterministic"})
            if counter.events != before:
                new = {k: v - before.get(k, 0) for k, v in counter.events.items() if v != before.get(k, 0)}
                failures.append({"index": i, "problem": f"guard fallback {new}: {counter.first}"[:300]})
            if on_input is not None:
                on_input(i)
    finally:
        mailtext.log = saved
    times.sort()
    return {
        "seed": seed,
        "inputs": n,
        "bytes": total_bytes,
        "failures": failures,
        "fallbacks": counter.events,
        "max_ms": 1000 * times[-1] if times else 0.0,
        "p99_ms": 1000 * times[int(0.99 * (len(times) - 1))] if times else 0.0,
        "mean_ms": 1000 * sum(times) / len(times) if times else 0.0,
    }

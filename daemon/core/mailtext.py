"""Raw RFC 822 bytes -> the exact text the model sees; training and serving both call `mail_text`,
so there is one definition of "the text of a mail" and its version is recorded with every adapter.

Everything here is pure, never raises and takes time linear in a bounded prefix of the input.
The MIME walk is our own small splitter over byte offsets rather than `email.feedparser`, and the
HTML-to-text step is our own tokenizer rather than `html.parser`: on Python 3.11.7 both stdlib
parsers have quadratic paths (a 1 MB parameter-laden Content-Type, 256 KB of "<a" take tens of
seconds), which a hostile sender can reach. The stdlib still does the well-bounded pieces
(`binascii`, `codecs`, `html.unescape`, `email.utils`).
"""

from __future__ import annotations

import binascii
import codecs
import hashlib
import html
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from functools import lru_cache

import structlog

log = structlog.get_logger(__name__)

# Bump whenever mail_text's output changes for ANY input (even whitespace): adapters record the
# version they were trained with, and the daemon compares it with this one.
MAILTEXT_VERSION = "1"

# Bounds that make the cost of one message independent of what the sender put in it. They are
# fixed (not derived from max_chars) so mail_text(raw, n) is always a prefix of mail_text(raw, m>n).
# The one rule for how much of a message anything looks at: mail_text, message_key and message_date
# read only these first bytes, and the IMAP watcher fetches exactly this prefix, so the watcher, the
# SMTP relay (whole message) and the trainer (whole file) compute the same text (no train/serve skew).
MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_HEADER_LINES = 20_000  # physical lines scanned per header block before jumping to the blank line
MAX_HEADER_VALUE = 8 * 1024  # bytes kept of one unfolded header value
MAX_DEPTH = 64  # MIME nesting levels walked
MAX_PARTS = 512  # MIME parts visited per message
MAX_PART_BYTES = 256 * 1024  # encoded bytes of the chosen text part that are decoded
MAX_HTML_CHARS = 256 * 1024  # decoded HTML characters fed to the HTML-to-text step
MAX_TEXT_CHARS = 100_000  # body characters that go through reply/signature trimming
MAX_SUBJECT_CHARS = 300  # a subject longer than this is noise and would crowd out the body

_WANTED_HEADERS = frozenset(
    {
        b"subject",
        b"from",
        b"to",
        b"date",
        b"message-id",
        b"content-type",
        b"content-transfer-encoding",
        b"content-disposition",
    }
)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def mail_text(raw: bytes, max_chars: int = 2000) -> str:
    """The model's view of a message: ``"Subject\\n\\nbody"`` (just the subject when there is no body).

    The body is the first inline text/plain part (else the first text/html part converted to
    text), charset-decoded leniently, with quoted replies, reply headers and signatures removed and
    whitespace collapsed; the result is cut to ``max_chars``. Never raises.
    """
    try:
        limit = int(max_chars)
    except Exception:  # a wrong type must not take the service down either
        limit = 2000
    if limit <= 0:
        return ""
    try:
        return _full_text(_as_bytes(raw))[:limit]
    except Exception as exc:  # the hostile-input guarantee: degrade, never crash the caller
        log.warning("mail_text_fallback", error=repr(exc)[:200])
        try:
            return _crude_text(_as_bytes(raw))[:limit]
        except Exception:
            return ""


def message_key(raw: bytes) -> str:
    """Dedupe/state key: the normalized Message-ID, else ``"sha256:<hex>"`` of stable headers + text.

    Never raises. The hash form includes mail_text, so for a message without a Message-ID it
    changes when MAILTEXT_VERSION changes.
    """
    try:
        buf = _as_bytes(raw)
        headers, _ = _parse_headers(buf, 0, len(buf))
        mid = _normalize_message_id(_header_text(headers.get(b"message-id")))
        if mid:
            return mid
        stable = "\n".join(
            f"{name}:{_header_text(headers.get(name.encode()))}" for name in ("from", "to", "date", "subject")
        )
        material = stable + "\n\n" + mail_text(buf)
        return "sha256:" + hashlib.sha256(material.encode("utf-8", "replace")).hexdigest()
    except Exception as exc:
        log.warning("message_key_fallback", error=repr(exc)[:200])
        try:
            return "sha256:" + hashlib.sha256(_as_bytes(raw)).hexdigest()
        except Exception:
            return "sha256:" + hashlib.sha256(b"").hexdigest()


_CONTENT_HEADERS = (b"from", b"to", b"date", b"subject")
_LINE_END = re.compile(rb"[ \t]*\r?\n")


def content_fingerprint(raw: bytes) -> str:
    """``"sha256:<hex>"`` of what makes a message itself: From, To, Date, Subject and the body,
    line endings and trailing blanks normalised, within the first MAX_INPUT_BYTES (what the
    watcher fetches). With ``message_key`` it tells a re-delivery (same fingerprint: skipped) from
    a different message that reuses a Message-ID (filed). Delivery headers (Received,
    Delivered-To, X-Mailtriage-*) do not count, so a re-delivered or tagged copy keeps it.
    Independent of MAILTEXT_VERSION. Never raises."""
    try:
        buf = _as_bytes(raw)
        headers, body_start = _parse_headers(buf, 0, len(buf))
        digest = hashlib.sha256()
        for name in _CONTENT_HEADERS:
            digest.update(name + b":" + _LINE_END.sub(b" ", headers.get(name, b"")).strip() + b"\n")
        digest.update(b"\n" + _LINE_END.sub(b"\n", buf[body_start:]).rstrip())
        return "sha256:" + digest.hexdigest()
    except Exception as exc:  # noqa: BLE001 - a key must always exist
        log.warning("content_fingerprint_fallback", error=repr(exc)[:200])
        return "sha256:" + hashlib.sha256(raw if isinstance(raw, bytes) else b"").hexdigest()


def message_date(raw: bytes) -> datetime | None:
    """The Date header as an aware UTC datetime; None when it is missing or unparseable. Never raises."""
    try:
        buf = _as_bytes(raw)
        headers, _ = _parse_headers(buf, 0, len(buf))
        value = _header_text(headers.get(b"date"))[:200]
        if not value:
            return None
        parsed = parsedate_to_datetime(value)
        if parsed.tzinfo is None:  # "-0000" means "UTC, origin zone unknown" (RFC 5322 3.3)
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.astimezone(timezone.utc)
    except Exception:
        return None


def message_headers(raw: bytes) -> dict[str, str]:
    """Decoded headers for logs: keys subject, from, to, message_id, date ("" when missing). Never raises."""
    out = {"subject": "", "from": "", "to": "", "message_id": "", "date": ""}
    try:
        buf = _as_bytes(raw)
        headers, _ = _parse_headers(buf, 0, len(buf))
        for key, name in (
            ("subject", b"subject"),
            ("from", b"from"),
            ("to", b"to"),
            ("message_id", b"message-id"),
            ("date", b"date"),
        ):
            out[key] = _header_text(headers.get(name))[:MAX_SUBJECT_CHARS]
    except Exception as exc:
        log.warning("message_headers_fallback", error=repr(exc)[:200])
    return out


# --------------------------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------------------------


def _as_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        data = raw
    elif isinstance(raw, (bytearray, memoryview)):
        data = bytes(raw[:MAX_INPUT_BYTES])
    elif isinstance(raw, str):  # a caller that already decoded; keep undecodable bytes as they were
        try:
            data = raw[:MAX_INPUT_BYTES].encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = raw[:MAX_INPUT_BYTES].encode("utf-8", "replace")
    else:
        return b""
    return data if len(data) <= MAX_INPUT_BYTES else data[:MAX_INPUT_BYTES]


def _full_text(buf: bytes) -> str:
    headers, body_start = _parse_headers(buf, 0, len(buf))
    subject = _one_line(_header_text(headers.get(b"subject")))[:MAX_SUBJECT_CHARS]
    body = _body_text(buf, _Part(headers, body_start, len(buf), 0))
    return f"{subject}\n\n{body}" if body else subject


def _crude_text(buf: bytes) -> str:
    """Last resort when the structured path failed: the first 64 KiB, headers split off by eye."""
    text = buf[:65536].decode("utf-8", "replace")
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    match = re.search(r"(?im)^subject:[ \t]*(.*)$", head)
    subject = _one_line(_normalize_chars(match.group(1) if match else ""))[:MAX_SUBJECT_CHARS]
    body = _collapse(_normalize_chars(body))
    return f"{subject}\n\n{body}" if body else subject


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------

_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_BLANK_LINE = re.compile(rb"\n\r?\n")


def _parse_headers(buf: bytes, start: int, end: int) -> tuple[dict[bytes, bytes], int]:
    """Header block at buf[start:end] -> (first value of each wanted header, unfolded; body offset).

    Like feedparser: the block ends at the first empty line, or before the first line that is
    neither a header nor a continuation (then that line starts the body).
    """
    headers: dict[bytes, bytes] = {}
    current: bytes | None = None  # name of the wanted header being unfolded, if any
    pieces: list[bytes] = []
    size = 0
    pos = start
    lines = 0

    def finish() -> None:
        if current is not None and current not in headers:
            headers[current] = b"".join(pieces)

    while pos < end:
        newline = buf.find(b"\n", pos, end)
        line_end = end if newline < 0 else newline
        next_pos = end if newline < 0 else newline + 1
        line = buf[pos : min(line_end, pos + MAX_HEADER_VALUE)].rstrip(b"\r")
        if not line:
            finish()
            return headers, next_pos
        if line[:1] in (b" ", b"\t"):
            if current is not None and size < MAX_HEADER_VALUE:
                pieces.append(line[: MAX_HEADER_VALUE - size])
                size += len(pieces[-1])
        else:
            match = _HEADER_NAME.match(line)
            if match is None:
                if lines == 0 and line.startswith(b"From "):  # mbox separator line
                    pos, lines = next_pos, lines + 1
                    continue
                finish()
                return headers, pos
            finish()
            name = line[: match.end() - 1].rstrip(b" \t").lower()
            current = name if name in _WANTED_HEADERS and name not in headers else None
            pieces, size = [line[match.end() :]], len(line) - match.end()
        lines += 1
        pos = next_pos
        if lines >= MAX_HEADER_LINES:  # absurd header block: stop reading it, find where it ends
            finish()
            blank = _BLANK_LINE.search(buf, pos - 1 if pos > start else pos, end)
            return headers, end if blank is None else blank.end()
    finish()
    return headers, end


_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,60})(?:\*[^?\s]{0,30})?\?([bBqQ])\?([^?\s]*)\?=")


def _header_text(value: bytes | None) -> str:
    """Raw header bytes -> text: raw 8-bit bytes guessed (utf-8, else cp1252), RFC 2047 words decoded."""
    if not value:
        return ""
    text = _decode_bytes(value, None)
    if "=?" in text:
        text = _decode_encoded_words(text)
    return _one_line(_normalize_chars(text))


def _decode_encoded_words(text: str) -> str:
    out: list[str] = []
    run: list[bytes] = []  # adjacent words in one charset are decoded together, so a multibyte
    run_charset = ""  # character split across two words survives
    last = -1  # end of the previous encoded word

    def flush() -> None:
        if run:
            out.append(_decode_bytes(b"".join(run), run_charset))
            run.clear()

    for match in _ENCODED_WORD.finditer(text):
        charset = match.group(1).lower()
        gap = text[max(last, 0) : match.start()]
        if last < 0 or gap.strip():  # RFC 2047 6.2: only whitespace *between* words is dropped
            flush()
            out.append(gap)
        elif charset != run_charset:
            flush()
        run_charset = charset
        data = match.group(3).encode("ascii", "replace")
        run.append(_b64decode(data) if match.group(2) in "bB" else binascii.a2b_qp(data, header=True))
        last = match.end()
    flush()
    out.append(text[max(last, 0) :])
    return "".join(out)


_PARAM_CACHE: dict[str, re.Pattern[str]] = {}


def _param(value: str, name: str) -> str:
    """A Content-Type/-Disposition parameter, unquoted; "" when absent."""
    pattern = _PARAM_CACHE.get(name)
    if pattern is None:
        pattern = re.compile(r'(?i)(?:^|;)\s*' + name + r'\s*=\s*(?:"([^"]*)"|([^;\s]*))')
        _PARAM_CACHE[name] = pattern
    match = pattern.search(value)
    if match is None:
        return ""
    return (match.group(1) if match.group(1) is not None else match.group(2)).strip().strip('"')


_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")


# --------------------------------------------------------------------------------------------
# MIME walk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    headers: dict[bytes, bytes]
    start: int  # body offsets into the one message buffer: parts are never copied while walking
    end: int
    depth: int

    def header(self, name: bytes) -> str:
        value = self.headers.get(name)
        return value.decode("latin-1").strip() if value else ""

    @property
    def content_type(self) -> str:
        value = self.header(b"content-type")
        if not value:
            return "text/plain"
        ctype = value.split(";", 1)[0].strip().lower()
        # RFC 2045 5.2: an unparseable Content-Type means the default, text/plain.
        return ctype if _MIME_TYPE.fullmatch(ctype) else "text/plain"

    @property
    def is_attachment(self) -> bool:
        return self.header(b"content-disposition").lower().startswith("attachment")


def _walk(buf: bytes, root: _Part) -> Iterator[tuple[_Part, str]]:
    """Leaf parts in document order with their content type; bounded depth and part count.

    Children are found lazily, so the walk stops scanning as soon as the caller has its text:
    a 20 MB attachment after the body is never even searched for boundaries.
    """
    stack: list[Iterator[tuple[_Part, str | None]]] = [iter([(root, None)])]
    visited = 0
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        visited += 1
        if visited > MAX_PARTS:
            return
        part, forced = item
        ctype = forced or part.content_type
        if ctype.startswith("multipart/"):
            if part.depth < MAX_DEPTH:
                stack.append(_children(buf, part))
        elif ctype == "message/rfc822" and not part.is_attachment:
            if part.depth < MAX_DEPTH:
                headers, body_start = _parse_headers(buf, part.start, part.end)
                stack.append(iter([(_Part(headers, body_start, part.end, part.depth + 1), None)]))
        else:
            yield part, ctype


_GUESS_BOUNDARY = re.compile(rb"(?m)^--([0-9A-Za-z'()+_,./:=?-]{1,70}?)(?:--)?[ \t]*\r?$")


def _children(buf: bytes, part: _Part) -> Iterator[tuple[_Part, str | None]]:
    """Children of a multipart body; the body itself as text/plain when no delimiter is found.

    A missing or wrong boundary parameter is common in broken mail, so when the declared one
    finds nothing we guess it from the first "--token" line.
    """
    boundary = _param(part.header(b"content-type"), "boundary").encode("latin-1", "replace")
    candidates = [boundary] if 0 < len(boundary) <= 200 else []  # RFC 2046: at most 70
    guess = _GUESS_BOUNDARY.search(buf, part.start, min(part.end, part.start + 65536))
    if guess is not None and guess.group(1) != boundary:
        candidates.append(guess.group(1))
    for candidate in candidates:
        found = False
        for start, end in _split_on(buf, part.start, part.end, candidate):
            found = True
            headers, body_start = _parse_headers(buf, start, end)
            yield _Part(headers, body_start, end, part.depth + 1), None
        if found:
            return
    yield part, "text/plain"


def _split_on(buf: bytes, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int]]:
    """Spans of the parts between "--boundary" delimiter lines (preamble and epilogue dropped).

    The delimiter search is one compiled pattern starting with a literal, so the regex engine
    skips non-matching text in C: lines that merely start with "--boundary" cost no Python steps.
    """
    tail = rb"(?:(--)[^\n]*|[ \t]*\r?)(?=\n|\Z)"  # a closing delimiter may carry junk after "--"
    first_line = re.compile(b"--" + re.escape(boundary) + tail)
    later_line = re.compile(b"\n--" + re.escape(boundary) + tail)
    first = first_line.match(buf, start, end)
    matches = itertools.chain([first] if first else [], later_line.finditer(buf, start, end))
    part_start: int | None = None
    count = 0
    for match in matches:
        if part_start is not None:
            part_end = max(part_start, match.start())  # the line break belongs to the delimiter
            if part_end > part_start and buf[part_end - 1] == 0x0D:
                part_end -= 1
            count += 1
            yield part_start, part_end
            if count >= MAX_PARTS:
                return
        if match.group(1):  # closing delimiter
            return
        part_start = min(match.end() + 1, end)
    if part_start is not None:  # unterminated last part: runs to the end
        yield part_start, end


def _body_text(buf: bytes, root: _Part) -> str:
    html_part: _Part | None = None
    for part, ctype in _walk(buf, root):
        if ctype not in ("text/plain", "text/html") or part.is_attachment:
            continue  # non-text parts (attachments, images) are never decoded
        if ctype == "text/html":
            html_part = html_part or part
            continue
        text = _part_text(buf, part)
        if _looks_like_html(text):  # mislabelled HTML (no or wrong Content-Type)
            html_part = html_part or part
            continue
        cleaned = _clean_body(text)
        if cleaned:
            return cleaned
    if html_part is not None:
        main, quoted = _html_to_text(_part_text(buf, html_part)[:MAX_HTML_CHARS])
        return _clean_body(main) or _clean_body(quoted)
    return ""


def _looks_like_html(text: str) -> bool:
    head = text[:512].lstrip().lower()
    return head.startswith("<!doctype html") or head.startswith("<html")


_META_CHARSET = re.compile(rb"""(?i)<meta[^>]{0,200}?charset\s*=\s*["']?([A-Za-z0-9_.:-]{1,40})""")


def _part_text(buf: bytes, part: _Part) -> str:
    data = buf[part.start : min(part.end, part.start + MAX_PART_BYTES)]
    encoding = part.header(b"content-transfer-encoding").lower()
    if encoding == "base64":
        data = _b64decode(data)
    elif encoding == "quoted-printable":
        data = binascii.a2b_qp(data)
    charset = _param(part.header(b"content-type"), "charset")
    if not charset and b"<" in data[:4096]:
        meta = _META_CHARSET.search(data, 0, 4096)
        charset = meta.group(1).decode("ascii") if meta else ""
    return _decode_bytes(data, charset or None)


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def _b64decode(data: bytes) -> bytes:
    """Lenient base64: junk characters and padding ignored, a truncated tail tolerated."""
    clean = _NOT_BASE64.sub(b"", data)
    if len(clean) % 4 == 1:
        clean = clean[:-1]
    clean += b"=" * (-len(clean) % 4)
    try:
        return binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return b""


# --------------------------------------------------------------------------------------------
# Charsets
# --------------------------------------------------------------------------------------------

# Labels senders use that Python does not know, or knows as a narrower set than the one meant.
_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-8-i": "iso8859-8",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "x-sjis": "shift_jis",
    "unicode-1-1-utf-7": "utf-7",
}
# Labels we refuse: Python "text" codecs that would interpret the bytes rather than decode them.
_REFUSED_CODECS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"})
# Declared as ASCII or Western European but routinely really UTF-8: valid UTF-8 wins for these.
_WESTERN = frozenset({"ascii", "iso8859-1", "cp1252"})


@lru_cache(maxsize=512)
def _codec(charset: str | None) -> str | None:
    if not charset:
        return None
    name = charset.strip().strip("\"'").lower()[:40]
    name = _CHARSET_ALIASES.get(name, name)
    try:
        info = codecs.lookup(name)
    except Exception:
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _REFUSED_CODECS:
        return None
    return info.name


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """Bytes -> str, never failing: the declared charset, then UTF-8, then cp1252, then latin-1.

    Strict decoding, except that an incomplete character at the very end is dropped: our byte
    caps can cut one in half, and that must not demote a whole UTF-8 part to cp1252.
    """
    codec = _codec(charset)
    if codec is not None and codec not in _WESTERN:
        try:
            return codecs.getincrementaldecoder(codec)().decode(data, final=False)
        except Exception:
            pass
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# --------------------------------------------------------------------------------------------
# HTML -> text
# --------------------------------------------------------------------------------------------

_TAG_NAME = re.compile(r"(/?)([A-Za-z][A-Za-z0-9:_-]*)")
_SKIP_CONTENT = frozenset({"script", "style", "title", "template"})
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "center", "dd", "div", "dl", "dt",
        "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav",
        "ol", "p", "pre", "section", "table", "tbody", "tfoot", "thead", "tr", "ul",
    }
)  # fmt: skip
_CELL_TAGS = frozenset({"td", "th"})
_END_TAG_CACHE: dict[str, re.Pattern[str]] = {}
_HEAD_END = re.compile(r"(?i)</head|<body")


def _html_to_text(doc: str) -> tuple[str, str]:
    """HTML -> (visible text, text inside <blockquote>, i.e. quoted replies).

    A single left-to-right pass; every find starts where the last one ended, or reuses the
    position of the next ">" it already knows, so the time is linear in the input.
    """
    main: list[str] = []
    quoted: list[str] = []
    quote_depth = 0
    n = len(doc)
    pos = 0
    gt = -2  # position of the next ">" at or after the current "<"; -2 = not looked up yet
    head_end = -2  # likewise for the end of <head>; -1 = there is none

    def emit(text: str) -> None:
        if text:
            (quoted if quote_depth else main).append(html.unescape(text) if "&" in text else text)

    while pos < n:
        lt = doc.find("<", pos)
        if lt < 0:
            emit(doc[pos:])
            break
        emit(doc[pos:lt])
        if doc.startswith("<!--", lt):
            close = doc.find("-->", lt + 4)
            if close < 0:
                break  # an unclosed comment hides the rest, as in a browser
            pos = close + 3
            continue
        if gt < lt:
            gt = doc.find(">", lt + 1)
            if gt < 0:
                emit(doc[lt:])  # no ">" anywhere after: the rest is text
                break
        tag = _TAG_NAME.match(doc, lt + 1, gt)
        if tag is None and doc[lt + 1 : lt + 2] not in ("!", "?"):
            emit("<")  # "a < b" is text, not a tag
            pos = lt + 1
            continue
        if doc.find("<", lt + 1, gt) >= 0:  # a stray "<" before the ">": it is text
            emit("<")
            pos = lt + 1
            continue
        pos = gt + 1
        if tag is None:  # <!DOCTYPE>, <?xml?>, <![CDATA[...]]>: nothing visible
            continue
        closing, name = tag.group(1) == "/", tag.group(2).lower()
        if not closing and name in _SKIP_CONTENT:
            pattern = _END_TAG_CACHE.get(name)
            if pattern is None:
                pattern = _END_TAG_CACHE[name] = re.compile(r"(?i)</" + name)
            end_tag = pattern.search(doc, pos)
            if end_tag is None:
                break  # unclosed <script>/<style> swallows the rest, as in a browser
            close = doc.find(">", end_tag.end())
            if close < 0:
                break
            pos = close + 1
        elif not closing and name == "head":
            if head_end != -1 and head_end < pos:  # remembered, so 10k "<head>"s cost one scan
                found = _HEAD_END.search(doc, pos)
                head_end = found.start() if found else -1
            if head_end != -1:  # a <head> that never ends is ignored rather than hiding all
                pos = head_end
        elif name == "blockquote":
            quote_depth = max(0, quote_depth + (-1 if closing else 1))
            emit("\n")
        elif name in _BLOCK_TAGS:
            emit("\n")
        elif name in _CELL_TAGS:
            emit(" ")
    return "".join(main), "".join(quoted)


# --------------------------------------------------------------------------------------------
# Text cleanup: characters, quoted replies, signatures, whitespace
# --------------------------------------------------------------------------------------------


def _build_translation() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for code in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]:
        table[code] = " "  # control characters (NUL included) read as a space
    for code in [0x09, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000]:
        table[code] = " "
    for code in [0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0xAD]:
        table[code] = None  # zero-width characters and soft hyphens are invisible
    table[0x2028] = "\n"
    table[0x2029] = "\n"
    return table


_TRANSLATION = _build_translation()
_SURROGATES = re.compile("[\ud800-\udfff]")  # some codecs (utf-7) can produce them; UTF-8 cannot hold them


def _normalize_chars(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_TRANSLATION)
    return _SURROGATES.sub("", text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _collapse(text: str) -> str:
    """Spaces collapsed, lines stripped, at most one empty line in a row."""
    text = re.sub(r"[ ]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_QUOTE_LINE = re.compile(r">")
_WROTE = re.compile(
    r"(?i).*\b(wrote|schrieb|a écrit|escribió|ha scritto|schreef|escreveu|skrev|napisał|kirjoitti)\s*:$"
)
_ATTRIBUTION_START = re.compile(r"(?i)(on|am|le|el|il|op|em|den|dne|w dniu)\b")
_ORIGINAL_MESSAGE = re.compile(
    r"(?i)-{2,}\s*(original message|ursprüngliche nachricht|message d'origine|mensaje original|"
    r"messaggio originale|oorspronkelijk bericht|mensagem original)\s*-{2,}$"
)
_UNDERSCORES = re.compile(r"_{20,}$")
_REPLY_FROM = re.compile(r"(?i)(from|von|de|van|da|från|fra|od)\s?:\s*\S")
# Field names of a quoted reply header block, by the role they play (several languages).
_REPLY_FIELDS = {
    "sent": re.compile(r"(?i)(sent|gesendet|envoyé|enviado|verzonden|inviato|skickat|sendt)\s?:"),
    "date": re.compile(r"(?i)(date|datum|data|fecha)\s?:"),
    "subject": re.compile(r"(?i)(subject|betreff|objet|asunto|onderwerp|oggetto|ämne|emne)\s?:"),
    "to": re.compile(r"(?i)(to|an|à|a|para|aan|till|til)\s?:"),
}
_ONE_LINE_OUTLOOK = re.compile(r"(?i)from:.*\bsent:")
_FORWARD_MARKER = re.compile(
    r"(?i)(-{2,}\s*(forwarded message|weitergeleitete nachricht|message transféré|mensaje reenviado)|"
    r"begin forwarded message:|anfang der weitergeleiteten nachricht:)"
)
_MOBILE_SIGNATURE = re.compile(
    r"(?i)(sent from (my |mail for |yahoo mail|outlook|samsung)|get outlook for |"
    r"von meinem .{1,40} gesendet|envoyé de mon |enviado desde mi |enviado do meu |inviato da |"
    r"verzonden (vanaf|met) |skickat från )"
)


def _is_cut_marker(lines: list[str], i: int) -> bool:
    """Does line i start a quoted tail or a signature (everything from here on is dropped)?"""
    line = lines[i]
    if line == "--" or _UNDERSCORES.match(line):
        return True
    if len(line) > 300:
        return False
    if _ORIGINAL_MESSAGE.match(line) or _ONE_LINE_OUTLOOK.match(line) or _WROTE.match(line):
        return True
    if len(line) <= 80 and _MOBILE_SIGNATURE.match(line):
        return True
    if _ATTRIBUTION_START.match(line):  # "On Mon, 1 Jan 2024, Jane Doe <jane@\nexample.com> wrote:"
        joined = line
        for nxt in lines[i + 1 : i + 3]:
            joined = f"{joined} {nxt}"
            if len(joined) <= 400 and _WROTE.match(joined):
                return True
    if _REPLY_FROM.match(line):
        # A reply header block: Outlook's "From:/Sent:", or From/Date/Subject/To all present. A
        # contact-form mail ("From: ... Date: ...") has no such block; a forward keeps its content.
        if any(_FORWARD_MARKER.match(prev) for prev in lines[max(0, i - 2) : i]):
            return False
        roles = {role for nxt in lines[i + 1 : i + 5] for role, rx in _REPLY_FIELDS.items() if rx.match(nxt)}
        return "sent" in roles or {"date", "subject", "to"} <= roles
    return False


def _clean_body(text: str) -> str:
    """Decoded body text -> what the model reads: quotes, reply tails and signatures removed.

    A cut marker only counts once some own text came before it, so a forward or a body that is
    nothing but a quote keeps its content instead of becoming empty.
    """
    text = _collapse(_normalize_chars(text[:MAX_TEXT_CHARS]))
    if not text:
        return ""
    lines = text.split("\n")
    kept: list[str] = []
    has_text = False
    for i, line in enumerate(lines):
        if _QUOTE_LINE.match(line):
            continue
        if has_text and _is_cut_marker(lines, i):
            break
        kept.append(line)
        has_text = has_text or bool(line)
    if has_text:
        return _collapse("\n".join(kept))
    # Only quoted lines: keep what they say rather than returning nothing.
    return _collapse("\n".join(re.sub(r"^(>\s?)+", "", line) for line in lines))


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------

_BRACKETED_ID = re.compile(r"<([^<>]{1,500})>")


def _normalize_message_id(value: str) -> str:
    match = _BRACKETED_ID.search(value)
    candidate = "".join(match.group(1).split()) if match else value.strip()
    if not candidate or len(candidate) > 250 or any(ch.isspace() for ch in candidate):
        return ""
    local, at, domain = candidate.rpartition("@")
    return f"{local}@{domain.lower()}" if at else candidate

"""The demo's synthetic mailbox: reproducible, complete, well-formed, and carrying the hard cases it promises."""

from __future__ import annotations

import email
import json
import re
from datetime import datetime, timezone
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from demo.corpus import _SPECS, CATEGORIES, LABELS_FILE, generate, main

pytestmark = pytest.mark.pure

PER_CATEGORY = 6
INBOX = 20
REQUIRED_HEADERS = ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, _class=EmailMessage, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _text(msg: EmailMessage, prefer: tuple[str, ...] = ("plain", "html")) -> str | None:
    part = msg.get_body(preferencelist=prefer)
    # Bodies keep the wire's CRLF after decoding; compare lines, not line endings.
    return None if part is None else part.get_content().replace("\r\n", "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("corpus")
    return out, generate(out, per_category=PER_CATEGORY, inbox=INBOX, seed=11)


@pytest.fixture(scope="module")
def messages(corpus: tuple[Path, dict[str, object]]) -> dict[str, EmailMessage]:
    out, _ = corpus
    return {str(p.relative_to(out)): _parse(p.read_bytes()) for p in sorted(out.rglob("*.eml"))}


def test_categories_are_fifteen_folder_safe_labels() -> None:
    assert len(CATEGORIES) == 15
    for label, folder in CATEGORIES.items():
        assert re.fullmatch(r"[a-z][a-z_]*", label), label
        assert re.fullmatch(r"Support/[A-Za-z]+", folder), folder
    assert len(set(CATEGORIES.values())) == 15


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", per_category=3, inbox=10, seed=5)
    generate(tmp_path / "b", per_category=3, inbox=10, seed=5)
    generate(tmp_path / "c", per_category=3, inbox=10, seed=6)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_counts_layout_and_labels(corpus: tuple[Path, dict[str, object]]) -> None:
    out, summary = corpus
    assert {p.name for p in (out / "history").iterdir()} == set(CATEGORIES)
    for label in CATEGORIES:
        assert len(list((out / "history" / label).glob("*.eml"))) == PER_CATEGORY
    inbox_files = sorted(p.name for p in (out / "inbox").glob("*.eml"))
    labels = json.loads((out / LABELS_FILE).read_text(encoding="utf-8"))
    assert len(inbox_files) == INBOX and sorted(labels) == inbox_files
    assert set(labels.values()) <= set(CATEGORIES)
    assert summary["history"] == PER_CATEGORY * 15 and summary["inbox"] == INBOX


def test_every_file_is_mail_with_the_required_headers(messages: dict[str, EmailMessage]) -> None:
    assert len(messages) == PER_CATEGORY * 15 + INBOX
    for name, msg in messages.items():
        for header in REQUIRED_HEADERS:
            assert header in msg, f"{name} lacks {header}"
        assert "support@example.com" in str(msg["To"]), name
        assert "@" in str(msg["From"]), name
        assert isinstance(msg["Date"].datetime, datetime) and msg["Date"].datetime.tzinfo is not None, name
        body = _text(msg)
        assert body is not None, f"{name} has no text body"
        assert len(body.strip()) > 20, name
        assert not msg.defects, f"{name}: {msg.defects}"


def test_message_ids_are_unique(messages: dict[str, EmailMessage]) -> None:
    ids = [str(msg["Message-ID"]) for msg in messages.values()]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", i) for i in ids)


def test_history_is_older_than_the_inbox(messages: dict[str, EmailMessage]) -> None:
    history = [m["Date"].datetime for n, m in messages.items() if n.startswith("history")]
    inbox = [m["Date"].datetime for n, m in messages.items() if n.startswith("inbox")]
    assert max(history) < min(inbox)
    assert (max(inbox) - min(history)).days > 120  # spread over months, not one afternoon


def test_the_hard_cases_are_present(corpus: tuple[Path, dict[str, object]], messages: dict[str, EmailMessage]) -> None:
    out, summary = corpus
    raws = [p.read_bytes() for p in sorted(out.rglob("*.eml"))]
    html_only = [m for m in messages.values() if m.get_content_type() == "text/html"]
    alternative = [m for m in messages.values() if m.get_content_type() == "multipart/alternative"]
    assert html_only and alternative
    texts = [t for m in messages.values() if (t := _text(m)) is not None]
    assert any(re.search(r"^> ", t, re.M) for t in texts), "no '> ' quoted replies"
    assert any(re.search(r"^On .+ wrote:$", t, re.M) for t in texts), "no 'On ... wrote:' attributions"
    assert any("-----Original Message-----" in t for t in texts)
    assert any(str(m["Subject"]).lower().startswith("re:") for m in messages.values())
    assert any(b"=?utf-8?" in r.split(b"\r\n\r\n")[0] for r in raws), "no encoded-word headers"
    assert any(m.get_content_charset() == "iso-8859-1" for m in messages.values() if not m.is_multipart())
    assert any(not t.isascii() for t in texts)
    assert summary["quoted"] > 0 and summary["html"] > 0


def test_quotes_carry_another_categorys_text(messages: dict[str, EmailMessage]) -> None:
    """Quote trimming has to matter: a reply's quoted part is often another category's opening line."""
    # The literal start of each category's opening sentences, up to the first slot.
    prefixes = {label: [o.split("{")[0] for o in spec.openers if len(o.split("{")[0]) >= 20]
                for label, spec in _SPECS.items()}
    foreign_quotes = 0
    for name, msg in messages.items():
        content = _text(msg, ("plain",))
        if not name.startswith("history") or content is None:
            continue
        match = re.search(r"^On .+ wrote:$", content, re.M)
        if match is None:
            continue
        quoted = " ".join(line.lstrip("> ") for line in content[match.end():].splitlines())
        label = name.split("/")[1]
        if any(pre in quoted for other, pres in prefixes.items() if other != label for pre in pres):
            foreign_quotes += 1
    assert foreign_quotes >= 5


def test_regenerating_smaller_leaves_no_stale_mail(tmp_path: Path) -> None:
    generate(tmp_path, per_category=4, inbox=8, seed=1)
    generate(tmp_path, per_category=2, inbox=3, seed=1)
    assert len(list((tmp_path / "history").rglob("*.eml"))) == 2 * 15
    assert len(list((tmp_path / "inbox").glob("*.eml"))) == 3


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_category"):
        generate(tmp_path, per_category=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        generate(tmp_path, start=datetime(2025, 1, 1))  # noqa: DTZ001 - the point of the test
    generate(tmp_path / "ok", per_category=1, inbox=1, start=datetime(2024, 3, 1, tzinfo=timezone.utc))


def test_cli_writes_and_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--per-category", "2", "--inbox", "4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "30 history" in printed[0] and "4 inbox" in printed[0]
    assert len(json.loads((tmp_path / LABELS_FILE).read_text(encoding="utf-8"))) == 4
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--per-category", "0"])

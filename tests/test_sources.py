"""Every training-data format load_source recognises, built as small temp trees, plus its errors."""

from __future__ import annotations

import io
import json
import mailbox
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from mailtriage.errors import TrainingDataError
from mailtriage.testing.builders import mail
from mailtriage_trainer.sources import Example, load_source

pytestmark = pytest.mark.pure

CATEGORIES = {"billing": "invoice wrong amount charged", "login": "cannot login password reset"}


def raw(label: str, i: int, headers: dict[str, str] | None = None) -> bytes:
    return mail(f"Hello, {CATEGORIES[label]} number {i}.", f"{label} question {i}", sender=f"customer{i}@example.com",
                message_id=f"<{label}-{i}@example.com>", date=f"Mon, {i + 1:02d} Jan 2024 10:00:00 +0000",
                headers=headers, linesep="\n")


def write_tree(root: Path, n: int = 3) -> Path:
    for label in CATEGORIES:
        (root / label).mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i}.eml").write_bytes(raw(label, i))
    return root


def by_label(examples: list[Example]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.label] = out.get(e.label, 0) + 1
    return out


def test_folder_per_category(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "data")
    (root / "README").write_text("not mail, outside any category folder")
    (root / "billing" / ".hidden").write_bytes(raw("billing", 99))
    examples = load_source(root, progress=False)
    assert by_label(examples) == {"billing": 3, "login": 3}
    e = next(e for e in examples if e.key == "billing-1@example.com")
    assert e.label == "billing"
    assert "invoice wrong amount" in e.text
    assert e.date == datetime(2024, 1, 2, 10, 0, tzinfo=timezone.utc)
    assert e.source.endswith("1.eml")


def test_wrapper_folder_is_stripped_like_the_20news_layout(tmp_path: Path) -> None:
    write_tree(tmp_path / "outer" / "20news-bydate-train", n=2)
    (tmp_path / "outer" / "20news-bydate-train" / "billing" / "deeper").mkdir()
    (tmp_path / "outer" / "20news-bydate-train" / "billing" / "deeper" / "x").write_bytes(raw("billing", 7))
    examples = load_source(tmp_path / "outer", progress=False)
    assert by_label(examples) == {"billing": 3, "login": 2}


def test_category_folders_that_are_maildirs(tmp_path: Path) -> None:
    (tmp_path / "md").mkdir()
    for label in CATEGORIES:
        md = mailbox.Maildir(tmp_path / "md" / label, create=True)
        for i in range(2):
            md.add(raw(label, i))
        (tmp_path / "md" / label / "tmp" / "partial").write_bytes(b"half a message")
        (tmp_path / "md" / label / "dovecot-uidlist").write_text("3 V1 N3\n")
    examples = load_source(tmp_path / "md", progress=False)
    assert by_label(examples) == {"billing": 2, "login": 2}


def test_maildir_plus_folders_mapped_through_categories(tmp_path: Path) -> None:
    md = mailbox.Maildir(tmp_path / "Maildir", create=True)
    md.add(raw("billing", 50))  # INBOX: unlabelled, skipped
    for label, folder in (("billing", "Support.Billing"), ("login", "Support.Login"), ("login", "Trash")):
        sub = md.add_folder(folder)
        for i in range(2):
            sub.add(raw(label, i + (10 if folder == "Trash" else 0)))
    examples = load_source(tmp_path / "Maildir", progress=False,
                           categories={"billing": "Support/Billing", "login": "Support/Login"})
    assert by_label(examples) == {"billing": 2, "login": 2}
    # without categories, each Maildir++ folder is its own label
    assert set(by_label(load_source(tmp_path / "Maildir", progress=False))) == {
        "Support.Billing", "Support.Login", "Trash"}


def test_directory_of_label_mbox_files(tmp_path: Path) -> None:
    (tmp_path / "boxes").mkdir()
    for label in CATEGORIES:
        box = mailbox.mbox(tmp_path / "boxes" / f"{label}.mbox")
        for i in range(3):
            msg = raw(label, i) + b"From the start of a body line, mbox quotes this.\n"
            box.add(msg)
        box.flush()
        box.close()
    examples = load_source(tmp_path / "boxes", progress=False)
    assert by_label(examples) == {"billing": 3, "login": 3}
    assert all("start of a body line" in e.text for e in examples)


def test_single_mbox_with_label_headers(tmp_path: Path) -> None:
    path = tmp_path / "all.mbox"
    box = mailbox.mbox(path)
    box.add(raw("billing", 0, {"X-Mailtriage-Label": "billing"}))
    box.add(raw("login", 1, {"X-Folder": "login"}))
    box.add(raw("login", 2))  # no label header: skipped
    box.flush()
    box.close()
    examples = load_source(path, progress=False)
    assert sorted(e.label for e in examples) == ["billing", "login"]


def test_mbox_without_any_label_header_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "inbox"
    box = mailbox.mbox(path)
    box.add(raw("billing", 0))
    box.flush()
    box.close()
    with pytest.raises(TrainingDataError, match="X-Mailtriage-Label"):
        load_source(path, progress=False)


def test_csv_with_aliases_dates_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(
        "id,text,category,date\n"
        "1,\"My invoice   is wrong\n\n\n\nplease fix\",billing,2024-03-01T10:00:00Z\n"
        "2,cannot login,login,2024-03-02\n"
        "3,,login,\n"
        "4,orphan text,,\n",
        encoding="utf-8",
    )
    examples = load_source(path, progress=False)
    assert [(e.label, e.key) for e in examples] == [("billing", "id:1"), ("login", "id:2")]
    assert examples[0].text == "My invoice is wrong\n\nplease fix"
    assert examples[0].date == datetime(2024, 3, 1, 10, 0, tzinfo=timezone.utc)
    assert examples[1].date == datetime(2024, 3, 2, tzinfo=timezone.utc)


def test_csv_without_the_needed_columns_names_them(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("subject,folder_name\nhello,x\n")
    with pytest.raises(TrainingDataError, match=r"columns \['folder_name', 'subject'\].*text column"):
        load_source(path, progress=False)


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"text": "refund please", "label": "refunds"}, {"text": "invoice", "label": "billing"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = load_source(path, progress=False)
    assert [e.label for e in examples] == ["refunds", "billing"]
    assert examples[0].key.startswith("sha1:") and examples[0].date is None


def test_jsonl_with_a_bad_line_says_where(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "b"}\nnot json\n')
    with pytest.raises(TrainingDataError, match="data.jsonl:2"):
        load_source(path, progress=False)


def test_tar_gz_of_a_folder_tree_read_in_place(tmp_path: Path) -> None:
    archive = tmp_path / "mail.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for label in CATEGORIES:
            for i in range(2):
                data = raw(label, i)
                info = tarfile.TarInfo(f"export-2024/{label}/{i}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    before = set(tmp_path.iterdir())
    examples = load_source(archive, progress=False)
    assert by_label(examples) == {"billing": 2, "login": 2}
    assert set(tmp_path.iterdir()) == before  # nothing extracted to disk


def test_mbox_files_inside_category_folders_of_an_archive(tmp_path: Path) -> None:
    archive = tmp_path / "export.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        for label in CATEGORIES:
            data = b"".join(b"From someone Mon Jan  1 00:00:00 2024\n" + raw(label, i) + b"\n" for i in range(3))
            info = tarfile.TarInfo(f"{label}/archive.mbox")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    examples = load_source(archive, progress=False)
    assert by_label(examples) == {"billing": 3, "login": 3}
    assert len({e.key for e in examples}) == 6


def test_categories_ignore_unknown_folders_and_match_folder_names(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "data", n=2)
    (root / "Spam").mkdir()
    (root / "Spam" / "1").write_bytes(raw("login", 9))
    examples = load_source(root, progress=False, categories={"billing": "Support/billing", "access": "Support/login"})
    assert by_label(examples) == {"billing": 2, "access": 2}


def test_errors_name_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="does not exist.*one sub-folder per category"):
        load_source(tmp_path / "missing", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError, match="empty directory"):
        load_source(tmp_path / "empty", progress=False)
    (tmp_path / "notes.txt").write_text("just some notes")
    with pytest.raises(TrainingDataError, match="cannot tell the format"):
        load_source(tmp_path / "notes.txt", progress=False)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "1.eml").write_bytes(raw("billing", 1))
    with pytest.raises(TrainingDataError, match="no labelled examples"):
        load_source(tmp_path / "flat", progress=False)
    with pytest.raises(TrainingDataError, match=r"Ignored folders/labels: \['billing', 'login'\]"):
        load_source(write_tree(tmp_path / "x", 1), progress=False, categories={"refunds": "R", "other": "O"})


def test_binary_files_and_broken_mbox_from_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    """They used to become training examples silently."""
    import random
    from collections import Counter

    from mailtriage_trainer.sources import SKIP_BINARY, SKIP_NO_HEADERS

    root = write_tree(tmp_path / "tree")
    rng = random.Random(7)
    (root / "billing" / "scan.jpg.eml").write_bytes(bytes(rng.randrange(256) for _ in range(20_000)))
    (root / "login" / "blob").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(500)))
    # An mboxo file whose body has an unquoted "From " line: the split leaves a headerless fragment.
    (root / "login" / "more.mbox").write_bytes(
        b"From a@example.com Mon Jan  1 10:00:00 2024\n" + raw("login", 7)
        + b"From the start of a body line, this was not quoted.\nmore body text\n"
    )
    skipped: Counter[str] = Counter()
    examples = load_source(root, progress=False, skipped=skipped)
    assert by_label(examples) == {"billing": 3, "login": 4}
    assert skipped[SKIP_BINARY] == 2 and skipped[SKIP_NO_HEADERS] == 1
    assert not any("not quoted" in e.text for e in examples)

    # The same in a directory of <label>.mbox files (the mailbox module splits those).
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    for label in CATEGORIES:
        (boxes / f"{label}.mbox").write_bytes(
            b"From a@example.com Mon Jan  1 10:00:00 2024\n" + raw(label, 1)
            + b"From here on the body was not quoted.\n\n"
            + b"From b@example.com Mon Jan  1 11:00:00 2024\n" + raw(label, 2)
        )
    skipped.clear()
    assert by_label(load_source(boxes, progress=False, skipped=skipped)) == {"billing": 2, "login": 2}
    assert skipped == Counter({SKIP_NO_HEADERS: 2})


def test_the_training_report_counts_what_was_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mailtriage_trainer.cli import main
    from mailtriage_trainer.sources import SKIP_BINARY

    monkeypatch.delenv("MAILTRIAGE_CONFIG", raising=False)
    monkeypatch.setattr("mailtriage_trainer.cli.DEFAULT_CONFIG", "/nonexistent/mailtriage.toml")
    root = write_tree(tmp_path / "tree", n=6)
    (root / "billing" / "noise").write_bytes(bytes(range(256)) * 4)
    assert main(["--data", str(root), "--dry-run", "--min-examples", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["data"]["skipped"] == {SKIP_BINARY: 1}

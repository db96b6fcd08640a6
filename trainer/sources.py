"""Harvest labelled training examples from wherever staff have sorted mail.

Every source becomes a list of ``Example`` whose text is exactly what the model will see at
serving time (``mailtriage.core.mailtext.mail_text`` for raw mail), so train/serve skew cannot creep in.

Formats ``load_source`` recognises (the label is always the category name):

- a directory with one sub-folder per category holding raw RFC 822 files, at any depth
  (the 20 Newsgroups layout; a category folder may itself be a Maildir, or hold ``*.mbox`` files);
- a Maildir root with Maildir++ folders (``.Support.Billing/``): each folder is a category;
  the root's own messages (the INBOX) are unlabelled and skipped;
- a directory of ``<label>.mbox`` files, one mbox per category;
- a single mbox file whose messages carry an ``X-Mailtriage-Label`` (or ``X-Folder``) header;
- a ``.tar``/``.tar.gz``/``.tgz`` archive of any folder tree above, read in place (no extraction);
- a ``.csv`` or ``.jsonl`` file with text and label columns (``text``/``body``/``message``/
  ``content``/``instruction`` and ``label``/``category``/``intent``/``folder``, first found wins;
  optional ``date`` and ``id``). Such text is plain text, not RFC 822: used as-is, whitespace tidied.

With ``categories`` (label -> IMAP folder, from config) a folder is matched by its label, its IMAP
folder name (``Support/Billing``), the Maildir++ spelling (``Support.Billing``) or the folder's last
component; folders matching no category are ignored and logged.
"""

from __future__ import annotations

import csv
import email.utils
import functools
import hashlib
import io
import json
import mailbox
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import structlog
from tqdm import tqdm

from mailtriage.errors import MailboxError, TrainingDataError

if TYPE_CHECKING:
    from mailtriage.config import AccountConfig, Config

log = structlog.get_logger(__name__)

LABEL_HEADERS = ("X-Mailtriage-Label", "X-Folder")
TEXT_COLUMNS = ("text", "body", "message", "content", "instruction")
LABEL_COLUMNS = ("label", "category", "intent", "folder")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# Files a mail server keeps next to messages; never mail themselves.
_NOT_MAIL = re.compile(r"^(dovecot.*|maildirfolder|subscriptions|courierimap.*|\..*)$")
_MAILDIR_SUBDIRS = ("cur", "new", "tmp")
_WHAT_WE_READ = (
    "a directory with one sub-folder per category of raw messages, a Maildir with Maildir++ "
    "folders, a directory of <label>.mbox files, an mbox with X-Mailtriage-Label headers, a "
    ".tar.gz of such a tree, or a .csv/.jsonl file with text,label columns"
)


@dataclass(frozen=True)
class Example:
    text: str                  # model input: mail_text() output, or tidied plain text for CSV/JSONL
    label: str                 # category name
    key: str                   # Message-ID (or a hash of stable headers / of the text)
    date: datetime | None      # when the mail was sent; drives the time-ordered split
    source: str                # where it came from, for error messages and reports


def load_source(
    spec: str | Path,
    *,
    categories: Mapping[str, str] | None = None,
    max_chars: int | None = None,
    progress: bool | None = None,
    skipped: Counter[str] | None = None,
) -> list[Example]:
    """Read every labelled example from ``spec``, auto-detecting its format (see module docstring).

    ``skipped``: when given, receives the count of what was read but not used, by reason
    (binary files, fragments that are no message, empty text, ...), for the training report.
    ``max_chars``: None uses mail_text's own default, which is what the daemon serves with.
    ``progress``: None shows a bar only on a terminal, False never.
    Raises TrainingDataError when the path is missing, the format unknown or nothing is labelled.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise TrainingDataError(f"training data {str(path)!r} does not exist; expected {_WHAT_WE_READ}")
    reader = _Reader(categories, max_chars, progress)
    if path.is_dir():
        examples = _load_directory(path, reader)
    else:
        examples = _load_file(path, reader)
    reader.log_skipped(path)
    if skipped is not None:
        skipped.update(reader.skipped)
    if not examples:
        wanted = f" for the categories {sorted(categories)}" if categories else ""
        raise TrainingDataError(
            f"no labelled examples found in {str(path)!r}{wanted}; expected {_WHAT_WE_READ}"
            + (f". Ignored folders/labels: {sorted(reader.ignored)}" if reader.ignored else "")
        )
    log.info("training_data_loaded", source=str(path), examples=len(examples),
             classes=len({e.label for e in examples}))
    return examples


def load_imap(
    cfg: Config,
    *,
    account: str | None = None,
    max_chars: int | None = None,
    progress: bool | None = None,
    skipped: Counter[str] | None = None,
) -> list[Example]:
    """Harvest each category folder of one account (``cfg.categories``: label -> folder).

    Fetches with ``BODY.PEEK[]`` on a read-only selected folder, so nothing is marked \\Seen.
    """
    from imapclient.exceptions import IMAPClientError

    from mailtriage.imap.connection import connect

    acc = _pick_account(cfg, account)
    reader = _Reader(None, max_chars, progress)
    examples: list[Example] = []
    client = connect(acc)
    try:
        for label, folder in cfg.categories.items():
            where = f"folder {folder!r} (category {label!r}) on account {acc.name!r}"
            try:
                if not client.folder_exists(folder):
                    raise TrainingDataError(
                        f"{where} does not exist; create it and file examples of {label!r} into it, "
                        "or fix [categories] in the config"
                    )
                client.select_folder(folder, readonly=True)
                uids = sorted(client.search(["NOT", "DELETED"]))
                bar = reader.bar(total=len(uids), desc=f"{label:<20.20}")
                for start in range(0, len(uids), acc.fetch_batch):
                    batch = uids[start:start + acc.fetch_batch]
                    response = client.fetch(batch, ["BODY.PEEK[]"])
                    for uid in batch:
                        raw = response.get(uid, {}).get(b"BODY[]")
                        if raw is None:  # expunged by someone else meanwhile
                            reader.skipped["vanished"] += 1
                            continue
                        ex = reader.from_raw(raw, label, f"imap://{acc.name}/{folder}/{uid}")
                        if ex is not None:
                            examples.append(ex)
                    bar.update(len(batch))
                bar.close()
            except (IMAPClientError, OSError) as exc:
                raise MailboxError(f"harvesting {where} failed: {exc}") from exc
            log.info("imap_folder_harvested", account=acc.name, folder=folder, label=label, messages=len(uids))
    finally:
        try:
            client.logout()
        except Exception:  # the harvest result matters, a failed goodbye does not
            pass
    reader.log_skipped(f"imap://{acc.name}")
    if skipped is not None:
        skipped.update(reader.skipped)
    if not examples:
        raise TrainingDataError(
            f"the category folders {list(cfg.categories.values())} on account {acc.name!r} hold no "
            "messages; file some examples into them (or train from --data)"
        )
    return examples


def _pick_account(cfg: Config, name: str | None) -> AccountConfig:
    if not cfg.accounts:
        from mailtriage.errors import ConfigError

        raise ConfigError(
            "training from IMAP needs an [[accounts]] entry in the config; or pass --data SOURCE "
            "to train from a directory, mbox, Maildir or CSV/JSONL"
        )
    if name is None:
        return cfg.accounts[0]
    for acc in cfg.accounts:
        if acc.name == name:
            return acc
    from mailtriage.errors import ConfigError

    raise ConfigError(f"no account named {name!r}; the config has {[a.name for a in cfg.accounts]}")


# ---- shared per-load state: label matching, mail text, skip counters --------------------------


class _Reader:
    def __init__(self, categories: Mapping[str, str] | None, max_chars: int | None, progress: bool | None) -> None:
        self.max_chars = max_chars
        self.progress = progress
        self.skipped: Counter[str] = Counter()
        self.ignored: set[str] = set()
        self._lookup: dict[str, str] | None = None
        if categories is not None:
            self._lookup = {}
            lastparts = Counter(re.split(r"[/.]", f)[-1] for f in categories.values())
            # Weakest spellings first so an exact label or folder name wins over a last component.
            for label, folder in categories.items():
                last = re.split(r"[/.]", folder)[-1]
                if lastparts[last] == 1:
                    self._lookup[last.casefold()] = label
            for label, folder in categories.items():
                for spelling in (folder.replace("/", "."), folder.replace(".", "/"), folder, label):
                    self._lookup[spelling.casefold()] = label

    def label_for(self, name: str) -> str | None:
        """The category a folder/file/column value names, or None to ignore it."""
        name = name.strip()
        if self._lookup is None:
            return name or None
        label = self._lookup.get(name.casefold())
        if label is None and name:
            self.ignored.add(name)
        return label

    def bar(self, total: int | None = None, desc: str = "reading") -> Any:
        disable = None if self.progress is None else not self.progress
        return tqdm(total=total, desc=desc, unit="msg", disable=disable, leave=False)

    def from_raw(self, raw: bytes, label: str, source: str) -> Example | None:
        from mailtriage.core.mailtext import mail_text, message_date, message_key

        not_mail = _not_a_message(raw)
        if not_mail:
            # mail_text never refuses input, so a JPEG in a category folder or the tail of a message
            # split at an unquoted "From " body line would otherwise become a training example.
            self.skipped[not_mail] += 1
            log.warning("not_a_message_skipped", source=source, reason=not_mail)
            return None
        try:
            text = mail_text(raw) if self.max_chars is None else mail_text(raw, max_chars=self.max_chars)
            key = message_key(raw)
            date = _aware(message_date(raw))
        except Exception as exc:  # mail_text promises not to raise; one bad file must not stop a harvest
            self.skipped["unreadable"] += 1
            log.warning("message_unreadable_skipped", source=source, error=repr(exc))
            return None
        if not text.strip():
            self.skipped["empty text"] += 1
            return None
        return Example(text=text, label=label, key=key, date=date, source=source)

    def from_plain(self, text: str, label: str, date: str | None, ident: str | None, source: str) -> Example | None:
        text = _tidy(text)[: self.max_chars or _mailtext_max_chars()]
        if not text:
            self.skipped["empty text"] += 1
            return None
        key = f"id:{ident}" if ident else "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()
        return Example(text=text, label=label, key=key, date=_parse_date(date), source=source)

    def log_skipped(self, where: object) -> None:
        if self.skipped:
            log.warning("messages_skipped", source=str(where), **dict(self.skipped))
        if self.ignored:
            log.warning("folders_ignored_not_a_category", source=str(where),
                        folders=sorted(self.ignored))


_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
SKIP_BINARY = "binary file (not a message)"
SKIP_NO_HEADERS = "no header block (not a message, or an mbox split at an unquoted 'From ' line)"


def _not_a_message(raw: bytes) -> str | None:
    """Why ``raw`` is no RFC 822 message (a ``skipped`` reason), or None when it looks like one.

    Binary: a NUL byte, or more than 10% control bytes, in the first 4 KiB (mail is text; binary
    attachments are base64). No header block: the first line is not ``Name: value`` (an mbox
    envelope ``From `` line before it is allowed).
    """
    head = bytes(raw[:4096])
    controls = sum(1 for b in head if b < 9 or 13 < b < 32 or b == 127)
    if b"\0" in head or controls > len(head) // 10:
        return SKIP_BINARY
    lines = head.lstrip(b"\r\n").split(b"\n", 2)
    first = lines[0]
    if first.startswith(b"From ") and len(lines) > 1:
        first = lines[1]
    if not _HEADER_LINE.match(first):
        return SKIP_NO_HEADERS
    return None


# ---- directories and archives: a tree of (relative path parts, bytes) -------------------------


def _load_directory(path: Path, reader: _Reader) -> list[Example]:
    if _is_maildir(path):
        return _load_maildir_plus(path, reader)
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    mboxes = [e for e in entries if e.is_file() and e.suffix == ".mbox"]
    if mboxes and not any(e.is_dir() for e in entries):
        out: list[Example] = []
        for mbox_path in sorted(mboxes):
            label = reader.label_for(mbox_path.stem)
            if label is not None:
                out.extend(_load_mbox(mbox_path, reader, fixed_label=label))
        return out
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise TrainingDataError(f"{str(path)!r} is an empty directory; expected {_WHAT_WE_READ}")
    tree = [(p.relative_to(path).parts, p.read_bytes, str(p)) for p in files]
    return _load_tree(tree, reader, str(path), total=len(tree))


def _load_tar(path: Path, reader: _Reader) -> list[Example]:
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise TrainingDataError(f"{str(path)!r} looks like a tar archive but cannot be read: {exc}") from exc
    with tf:
        # Iterating a TarFile walks members in archive order, so each read is a forward seek.
        def members() -> Iterator[tuple[tuple[str, ...], Callable[[], bytes], str]]:
            for m in tf:
                if m.isfile():
                    def read(m: tarfile.TarInfo = m) -> bytes:
                        fh = tf.extractfile(m)
                        return fh.read() if fh is not None else b""
                    yield PurePosixPath(m.name).parts, read, f"{path}:{m.name}"

        return _load_tree(members(), reader, str(path), total=None)


def _load_tree(
    entries: Iterable[tuple[tuple[str, ...], Callable[[], bytes], str]],
    reader: _Reader,
    where: str,
    total: int | None,
) -> list[Example]:
    """Label = first path component below the common top folder(s); files at the top are ignored."""
    # Read first, label after: only the whole tree tells how many wrapper folders to strip.
    loaded: list[tuple[tuple[str, ...], list[tuple[str, bytes, str]]]] = []
    bar = reader.bar(total=total, desc="reading")
    for parts, read, source in entries:
        bar.update(1)
        if not parts or _NOT_MAIL.match(parts[-1]) or any(p.startswith(".") for p in parts[:-1] if p != ".") \
                or (len(parts) >= 2 and parts[-2] == "tmp"):
            continue
        data = read()
        if not data.strip():
            reader.skipped["empty file"] += 1
            continue
        if parts[-1].endswith(".mbox"):
            msgs = [(str(i), m, f"{source}#{i}") for i, m in enumerate(_mbox_messages(data))]
        else:
            msgs = [("", data, source)]
        loaded.append((parts, msgs))
    bar.close()
    if not loaded:
        raise TrainingDataError(f"{where!r} holds no message files; expected {_WHAT_WE_READ}")
    strip = 0
    while True:
        firsts = {p[strip] for p, _ in loaded if len(p) > strip}
        deep = all(len(p) > strip + 2 for p, _ in loaded)
        nxt = {p[strip + 1] for p, _ in loaded if len(p) > strip + 1}
        if len(firsts) == 1 and deep and not nxt <= set(_MAILDIR_SUBDIRS):
            strip += 1
        else:
            break
    out: list[Example] = []
    top_level = 0
    for parts, msgs in loaded:
        rel = parts[strip:]
        if len(rel) < 2:
            top_level += 1
            continue
        label = reader.label_for(rel[0])
        if label is None:
            continue
        for _, raw, source in msgs:
            ex = reader.from_raw(raw, label, source)
            if ex is not None:
                out.append(ex)
    if top_level:
        reader.skipped["file outside a category folder"] += top_level
    return out


def _is_maildir(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in ("cur", "new")) and any(
        e.name.startswith(".") and (e / "cur").is_dir() for e in path.iterdir()
    )


def _load_maildir_plus(path: Path, reader: _Reader) -> list[Example]:
    md = mailbox.Maildir(path, factory=None, create=False)
    names = sorted(md.list_folders())
    total_inbox = len(md)
    if total_inbox:
        reader.skipped["unlabelled Maildir root (INBOX) message"] += total_inbox
    out: list[Example] = []
    for name in names:
        label = reader.label_for(name)
        if label is None:
            continue
        folder = md.get_folder(name)
        keys = sorted(folder.iterkeys())
        bar = reader.bar(total=len(keys), desc=f"{label:<20.20}")
        for key in keys:
            bar.update(1)
            try:
                raw = folder.get_bytes(key)
            except (KeyError, OSError):  # moved by the server while we read
                reader.skipped["vanished"] += 1
                continue
            ex = reader.from_raw(raw, label, f"{path}/.{name}/{key}")
            if ex is not None:
                out.append(ex)
        bar.close()
    return out


# ---- mbox ---------------------------------------------------------------------------------


_UNQUOTE_FROM = re.compile(rb"(?m)^>(>*From )")


def _mbox_messages(data: bytes) -> list[bytes]:
    """Split mbox bytes at 'From ' lines (mboxrd '>From ' quoting undone)."""
    msgs: list[bytes] = []
    current: list[bytes] = []
    started = False
    for line in io.BytesIO(data):
        if line.startswith(b"From "):
            if started and current:
                msgs.append(b"".join(current))
            current, started = [], True
            continue
        if not started:
            continue
        line = _UNQUOTE_FROM.sub(rb"\1", line)
        current.append(line)
    if started and current:
        msgs.append(b"".join(current))
    return msgs


def _load_mbox(path: Path, reader: _Reader, fixed_label: str | None = None) -> list[Example]:
    box = mailbox.mbox(path, factory=None, create=False)
    keys = list(box.iterkeys())
    out: list[Example] = []
    unlabelled = 0
    bar = reader.bar(total=len(keys), desc=f"{(fixed_label or path.name):<20.20}")
    for key in keys:
        bar.update(1)
        # mailbox keeps the '>From ' quoting; undone here so mail_text does not take it for a quoted reply.
        raw = _UNQUOTE_FROM.sub(rb"\1", box.get_bytes(key))
        label = fixed_label
        if label is None:
            found = _header_label(raw)
            label = reader.label_for(found) if found else None
            if found is None:
                unlabelled += 1
            if label is None:
                continue
        ex = reader.from_raw(raw, label, f"{path}#{key}")
        if ex is not None:
            out.append(ex)
    bar.close()
    if fixed_label is None and not out:
        raise TrainingDataError(
            f"mbox {str(path)!r} has {len(keys)} messages but none with a usable "
            f"{' or '.join(LABEL_HEADERS)} header naming its category; add that header, or split "
            "the mail into one <label>.mbox per category in a directory"
        )
    if unlabelled:
        reader.skipped[f"message without {LABEL_HEADERS[0]} header"] += unlabelled
    return out


def _header_label(raw: bytes) -> str | None:
    head = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    for name in LABEL_HEADERS:
        m = re.search(rb"^" + name.encode() + rb":[ \t]*(.*?)\r?$", head, re.IGNORECASE | re.MULTILINE)
        if m and m.group(1).strip():
            return m.group(1).decode("utf-8", "replace").strip()
    return None


# ---- files -------------------------------------------------------------------------------


def _load_file(path: Path, reader: _Reader) -> list[Example]:
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return _load_tar(path, reader)
    if name.endswith(".csv"):
        return _load_rows(path, _csv_rows(path), reader)
    if name.endswith((".jsonl", ".ndjson")):
        return _load_rows(path, _jsonl_rows(path), reader)
    with path.open("rb") as fh:
        head = fh.read(5)
    if name.endswith(".mbox") or head == b"From ":
        return _load_mbox(path, reader)
    if tarfile.is_tarfile(path):
        return _load_tar(path, reader)
    raise TrainingDataError(
        f"cannot tell the format of {str(path)!r} (not .csv, .jsonl, .mbox, a tar archive, nor an "
        f"mbox starting with 'From '); expected {_WHAT_WE_READ}"
    )


def _csv_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        # The csv module's default field limit (128 KiB) is smaller than some real mail bodies.
        csv.field_size_limit(16 * 1024 * 1024)
        for i, row in enumerate(csv.DictReader(fh), start=2):
            yield i, row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with path.open(encoding="utf-8-sig") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise TrainingDataError(f"{path}:{i} is not valid JSON ({exc}); expected one object per line") from exc
            if not isinstance(row, dict):
                raise TrainingDataError(f"{path}:{i} is a JSON {type(row).__name__}; expected an object with text and label")
            yield i, row


def _load_rows(path: Path, rows: Iterator[tuple[int, Mapping[str, Any]]], reader: _Reader) -> list[Example]:
    out: list[Example] = []
    columns: tuple[str, str] | None = None
    date_col: Any = None
    id_col: Any = None
    bar = reader.bar(desc="reading")
    for line_no, row in rows:
        bar.update(1)
        if columns is None:
            keys = {str(k).strip().lower(): k for k in row if k is not None}
            text_col = next((keys[c] for c in TEXT_COLUMNS if c in keys), None)
            label_col = next((keys[c] for c in LABEL_COLUMNS if c in keys), None)
            if text_col is None or label_col is None:
                raise TrainingDataError(
                    f"{str(path)!r} has columns {sorted(keys)}; expected a text column (one of "
                    f"{list(TEXT_COLUMNS)}) and a label column (one of {list(LABEL_COLUMNS)})"
                )
            columns = (text_col, label_col)
            lower = {str(k).lower(): k for k in row if k is not None}
            date_col, id_col = lower.get("date"), lower.get("id")
        text, raw_label = row.get(columns[0]), row.get(columns[1])
        if not isinstance(text, str) or raw_label is None or not str(raw_label).strip():
            reader.skipped["row without text or label"] += 1
            continue
        label = reader.label_for(str(raw_label))
        if label is None:
            continue
        date = row.get(date_col) if date_col else None
        ident = row.get(id_col) if id_col else None
        ex = reader.from_plain(text, label, str(date) if date else None,
                               str(ident) if ident not in (None, "") else None, f"{path}:{line_no}")
        if ex is not None:
            out.append(ex)
    bar.close()
    if columns is None:
        raise TrainingDataError(f"{str(path)!r} has no rows; expected a header and rows with text,label")
    return out


# ---- small helpers -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mailtext_max_chars() -> int:
    """mail_text's default bound, so plain-text rows are cut where served mail is cut."""
    import inspect

    from mailtriage.core.mailtext import mail_text

    default = inspect.signature(mail_text).parameters.get("max_chars")
    return default.default if default is not None and isinstance(default.default, int) else 2000


def _tidy(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)  # a naive date is taken as UTC so all compare
    return value


def _parse_date(value: str | None) -> datetime | None:
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        return _aware(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        pass
    try:
        return _aware(email.utils.parsedate_to_datetime(value))
    except (TypeError, ValueError, IndexError):
        return None


def labels_of(examples: Sequence[Example]) -> list[str]:
    """Labels present, sorted: the label order when no config names one."""
    return sorted({e.label for e in examples})

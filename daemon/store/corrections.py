"""The feedback path: mail staff moved out of the folder the daemon chose is a correction.

A message the daemon filed as A that now sits in category B's folder is a correction (predicted A,
actual B); one it sent to the unsure folder that staff sorted into a category folder is a fresh
labelled example. Both are recorded in the state database (live accuracy, next retrain's data).

The matching is pure (``match_corrections``); ``scan_corrections`` is the IMAP edge. It reads only
the Message-ID header of each message (the whole message only when it has none), and caches keys
per (folder, UIDVALIDITY, UID) across scans, so a periodic scan of large folders fetches only what
is new.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from mailtriage import metrics
from mailtriage.config import AccountConfig, Config
from mailtriage.core.mailtext import message_key
from mailtriage.imap.namespace import server_folder
from mailtriage.store.state import MILTER_INTAKE, SMTP_INTAKE, FiledRow, StateDB

log = structlog.get_logger(__name__)

# UIDs per FETCH: bounded response size, few round trips.
_FETCH_CHUNK = 500
_MID_ITEM = b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
_MID_KEY = b"BODY[HEADER.FIELDS (MESSAGE-ID)]"
_FULL_ITEM = b"BODY.PEEK[]"
_FULL_KEY = b"BODY[]"
_HASH_PREFIX = "sha256:"  # mailtext.message_key's form when a message has no usable Message-ID


@dataclass(frozen=True)
class FiledMessage:
    """What the daemon decided for one message (the fields of a state row this module needs)."""

    key: str
    label: str
    unsure: bool


@dataclass(frozen=True)
class Correction:
    key: str
    account: str
    predicted: str        # the label the daemon chose (for an unsure message: its best guess)
    actual: str           # the category whose folder the message now sits in
    was_unsure: bool      # True: it was in the unsure folder, so this is a new labelled example


def match_corrections(
    account: str,
    filed: Iterable[FiledMessage],
    found: Mapping[str, Iterable[str]],
) -> list[Correction]:
    """Pure: compare the daemon's decisions with where messages are now.

    ``found`` maps each category label to the message keys now in its folder. A message found in
    the folder of the label it was filed as is not a correction, even if a copy also sits
    elsewhere (staff copied it: ambiguous, so the daemon's label stands). A message found in two
    other category folders is ambiguous too and skipped. Messages the daemon never decided are
    ignored (history, or mail it never saw).
    """
    where: dict[str, set[str]] = {}
    for label, keys in found.items():
        for key in keys:
            where.setdefault(key, set()).add(label)
    out: list[Correction] = []
    seen: set[str] = set()
    for row in filed:
        if row.key in seen:  # the same message decided twice (e.g. re-delivered): judge it once
            continue
        seen.add(row.key)
        labels = where.get(row.key)
        if not labels:
            continue
        if row.unsure:
            if len(labels) == 1:
                (actual,) = labels
                out.append(Correction(row.key, account, row.label, actual, was_unsure=True))
            continue
        if row.label in labels or len(labels) != 1:
            continue
        (actual,) = labels
        out.append(Correction(row.key, account, row.label, actual, was_unsure=False))
    return out


# -- IMAP edge --------------------------------------------------------------------------------


@dataclass
class KeyCache:
    """Message keys already read, per (account, folder): {UIDVALIDITY, {uid: key}}; reused across scans."""

    folders: dict[tuple[str, str], tuple[int, dict[int, str]]] = field(default_factory=dict)


def folder_keys(client: Any, folder: str, cached: tuple[int, dict[int, str]] | None = None) -> tuple[int, dict[int, str]]:
    """``(UIDVALIDITY, {uid: message key})`` for every message in ``folder`` (selected read-only).

    Only UIDs not in ``cached`` (same UIDVALIDITY) are fetched, and only their Message-ID header;
    a message without one is fetched whole, since ``mailtext.message_key`` then hashes its text.
    """
    info = client.select_folder(folder, readonly=True)
    uidvalidity = int(info.get(b"UIDVALIDITY", 0))
    known: dict[int, str] = dict(cached[1]) if cached and cached[0] == uidvalidity else {}
    uids = list(client.search(["ALL"])) if int(info.get(b"EXISTS", 1)) else []
    present = set(uids)
    known = {u: k for u, k in known.items() if u in present}
    todo = sorted(present - known.keys())
    need_full: list[int] = []
    for start in range(0, len(todo), _FETCH_CHUNK):
        chunk = todo[start : start + _FETCH_CHUNK]
        for uid, data in client.fetch(chunk, [_MID_ITEM]).items():
            # The key is the normalized Message-ID when there is one, so the Message-ID line alone
            # gives the same key as the whole message. Without one, message_key hashes headers
            # and text: only then is the full message fetched.
            key = message_key(data.get(_MID_KEY) or b"")
            if key.startswith(_HASH_PREFIX):
                need_full.append(uid)
            else:
                known[uid] = key
    for uid in need_full:  # one at a time: these may be large, and they are rare
        for got_uid, data in client.fetch([uid], [_FULL_ITEM]).items():
            known[got_uid] = message_key(data.get(_FULL_KEY) or b"")
    return uidvalidity, known


def scan_account(
    client: Any, account: AccountConfig, config: Config, state: StateDB, cache: KeyCache | None = None
) -> list[Correction]:
    """Scan one logged-in account's category folders and return (not record) its corrections."""
    found: dict[str, list[str]] = {}
    for label, folder in config.categories.items():
        try:
            cached = cache.folders.get((account.name, folder)) if cache else None
            result = folder_keys(client, server_folder(client, folder), cached)
        except Exception as exc:  # noqa: BLE001 - a missing folder must not stop the others
            log.warning("correction_scan_folder_failed", account=account.name, folder=folder, error=str(exc))
            continue
        if cache is not None:
            cache.folders[(account.name, folder)] = result
        found[label] = list(result[1].values())
    return match_corrections(account.name, _filed(state, account), found)


def decisions(state: StateDB, account: str) -> list[FiledRow]:
    """The decisions that put mail into ``account``'s folders: its own, then the SMTP filter's and the
    milter's (their mail is delivered into the mailboxes, so moving it is a correction too). The
    correction scan judges them; the trainer (``mailtriage_trainer.origins``) tells the daemon's
    filings from staff labels with them."""
    return [*state.filed(account=account), *state.filed(account=SMTP_INTAKE), *state.filed(account=MILTER_INTAKE)]


def _filed(state: StateDB, account: AccountConfig) -> list[FiledMessage]:
    """``decisions`` as the matcher takes them (the account's own decision wins for a key)."""
    return [FiledMessage(row.key, row.label, row.unsure) for row in decisions(state, account.name)]


def scan_corrections(
    client_factory: Callable[[AccountConfig], Any],
    config: Config,
    state: StateDB,
    cache: KeyCache | None = None,
    accounts: Sequence[AccountConfig] | None = None,
) -> list[Correction]:
    """For every account: find corrections, record the new ones, count them; return the new ones.

    Blocking (IMAP): call it from a worker thread. One failing account is logged and skipped.
    """
    new: list[Correction] = []
    for account in accounts if accounts is not None else config.accounts:
        try:
            client = client_factory(account)
        except Exception as exc:  # noqa: BLE001 - retried at the next scan
            log.warning("correction_scan_connect_failed", account=account.name, error=str(exc))
            continue
        try:
            found = scan_account(client, account, config, state, cache)
        except Exception as exc:  # noqa: BLE001
            log.warning("correction_scan_failed", account=account.name, error=str(exc))
            continue
        finally:
            try:
                client.logout()
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass
        for corr in found:
            if state.record_correction(corr.key, corr.account, corr.predicted, corr.actual, corr.was_unsure):
                metrics.CORRECTIONS.labels(predicted=corr.predicted, actual=corr.actual).inc()
                log.info(
                    "correction_found",
                    account=corr.account,
                    key=corr.key,
                    predicted=corr.predicted,
                    actual=corr.actual,
                    was_unsure=corr.was_unsure,
                )
                new.append(corr)
    return new


# -- instant learning (IMAPSieve) ----------------------------------------------------------------


def learn_moved(
    state: StateDB, config: Config, account: AccountConfig, destination: str, raw: bytes
) -> Correction | None:
    """One message staff just copied or moved into ``destination`` (the IMAPSieve hook's report).

    The same rule as the periodic scan (``match_corrections``), for one message in one folder: a
    message the daemon filed as another category, or sent to the unsure folder, becomes a correction
    at once. Anything else (a folder that is no category, mail the daemon never decided, a move into
    the folder it chose) returns None. Recording is idempotent, so the later scan does not count it twice.
    """
    label = next((name for name, folder in config.categories.items() if folder == destination), None)
    if label is None:
        log.info("learn_ignored", account=account.name, mailbox=destination, reason="not a category folder")
        return None
    key = message_key(raw)
    filed = [row for row in _filed(state, account) if row.key == key]
    found = match_corrections(account.name, filed, {label: [key]})
    if not found:
        log.info("learn_ignored", account=account.name, mailbox=destination, key=key,
                 reason="never filed by the daemon" if not filed else "already in the folder it was filed to")
        return None
    (corr,) = found
    if state.record_correction(corr.key, corr.account, corr.predicted, corr.actual, corr.was_unsure):
        log.info("correction_learned", account=corr.account, key=corr.key, predicted=corr.predicted,
                 actual=corr.actual, was_unsure=corr.was_unsure)
    return corr

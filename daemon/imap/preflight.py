"""What an account needs from its IMAP server, written once: `mailtriage check` prints these
findings, `serve` (the watcher) refuses to act on a FAIL. One rule each, so the two never disagree.

Each function returns findings (OK/WARN/FAIL, subject, what was found, how to fix); none raises on
a refusal it can report. ``raise_failures`` turns FAILs into one permanent MailboxError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mailtriage.config import AccountConfig, Config
from mailtriage.errors import MailboxError
from mailtriage.imap.namespace import Namespace, namespace_of, server_folder

OK, WARN, FAIL = "OK", "WARN", "FAIL"
FILING_ACTIONS = ("move", "header", "label")  # the actions that put mail into the category folders


@dataclass(frozen=True)
class Finding:
    status: str          # OK | WARN | FAIL
    subject: str         # what was checked, e.g. "[support] folder 'Support/Billing'"
    detail: str          # what was found
    fix: str = ""        # how to fix it (WARN/FAIL)
    folder: str | None = None  # the folder it is about, if any

    def line(self) -> str:
        text = f"{self.status:<4}  {self.subject}: {self.detail}"
        return f"{text} -> fix: {self.fix}" if self.fix else text


def capabilities(has: Callable[[str], bool], account: AccountConfig) -> list[Finding]:
    """IDLE (else polling), and what the configured action needs: MOVE or UIDPLUS, UIDPLUS."""
    where = f"[{account.name}]"
    out: list[Finding] = []
    if has("IDLE"):
        # Only the capability is known here: check writes no mail, so how soon this server reports new
        # mail in IDLE (at once, or only at its own poll) is not measured, and not claimed.
        out.append(Finding(
            OK, f"{where} IDLE", "advertised (not measured): new mail is filed when the server reports it in "
            "IDLE (some servers do only at their own poll), and at the latest when the watcher renews IDLE "
            f"and rescans (idle_timeout = {account.idle_timeout} s)",
        ))
    else:
        out.append(Finding(
            WARN, f"{where} IDLE", f"not offered: falling back to polling every {account.poll_interval} s",
            f"lower accounts[{account.name!r}].poll_interval if that is too slow",
        ))
    if account.action == "move":
        if has("MOVE"):
            out.append(Finding(OK, f"{where} MOVE", "supported (atomic move)"))
        elif has("UIDPLUS"):
            out.append(Finding(
                WARN, f"{where} MOVE", "not offered: will COPY + UID EXPUNGE (UIDPLUS), two steps instead of one",
                "nothing to do; a server with MOVE (RFC 6851) is faster",
            ))
        else:
            out.append(Finding(
                FAIL, f"{where} MOVE", "neither MOVE nor UIDPLUS offered: mail cannot be moved without "
                "expunging other messages flagged \\Deleted",
                f"use a server with MOVE or UIDPLUS, or set accounts[{account.name!r}].action = \"keyword\"",
            ))
    elif account.action == "label":
        if has("X-GM-EXT-1"):
            out.append(Finding(OK, f"{where} X-GM-EXT-1", "supported (Gmail labels: STORE +X-GM-LABELS)"))
        else:
            out.append(Finding(
                FAIL, f"{where} X-GM-EXT-1", "not offered: action = \"label\" needs Gmail's IMAP extensions "
                "(X-GM-LABELS), and this server is not Gmail",
                f"set accounts[{account.name!r}].action = \"move\" (or \"keyword\") for this server",
            ))
    elif account.action == "header":
        if has("UIDPLUS"):
            out.append(Finding(OK, f"{where} UIDPLUS", "supported (the original is removed by UID after the tagged copy)"))
        else:
            out.append(Finding(
                FAIL, f"{where} UIDPLUS", "not offered: the header action cannot remove exactly the original",
                f"set accounts[{account.name!r}].action = \"keyword\" or \"move\"",
            ))
    return out


def folders(client: Any, account: AccountConfig, config: Config, *, create: bool = False) -> list[Finding]:
    """The category and unsure folders exist (or are created with ``create``). A missing one FAILs
    for the filing actions; for action = "keyword" nothing is filed there, so it only WARNs.

    Each configured name is looked up as the server spells it (``namespace.server_folder``: "/"
    becomes the server's separator, under its personal prefix); a name that cannot be mapped, or
    two names that are one folder there, FAIL with what to write."""
    where = f"[{account.name}]"
    existing = {name for _flags, _delim, name in client.list_folders()}
    needed = account.action in FILING_ACTIONS
    out: list[Finding] = []
    mapped: dict[str, str] = {}  # server name -> the configured name that claimed it
    for folder in dict.fromkeys([*config.categories.values(), config.unsure_folder, config.quarantine()]):
        subject = f"{where} folder {folder!r}"
        try:
            server = server_folder(client, folder)
        except MailboxError as exc:
            out.append(Finding(FAIL, subject, str(exc).removeprefix(f"folder {folder!r}: "),
                               "change it in [categories] / unsure_folder / quarantine_folder", folder=folder))
            continue
        if server != folder:
            subject += f" (on the server: {server!r})"
        if server in mapped:
            out.append(Finding(
                FAIL, subject, f"is the same server folder as {mapped[server]!r}",
                "give each category, unsure_folder and quarantine_folder a folder of its own", folder=folder,
            ))
            continue
        mapped[server] = folder
        if server in existing:
            out.append(Finding(OK, subject, "exists"))
        elif create:
            try:
                client.create_folder(server)
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                out.append(Finding(FAIL, subject, f"missing, and CREATE {server!r} failed: {exc}",
                                   f"create it in the mail server ({namespace_of(client).describe()})"))
            else:
                out.append(Finding(OK, subject, "was missing: created"))
        else:
            out.append(Finding(
                FAIL if needed else WARN, subject,
                "missing (mail cannot be filed there)" if needed
                else "missing (not needed while action = \"keyword\")",
                "run `mailtriage check --create-folders`, or fix [categories] / unsure_folder",
                folder=folder,
            ))
    return out


def keywords_allowed(select_info: Mapping[bytes, Any]) -> bool:
    """May new keywords be stored, by the answer to a read-write SELECT? RFC 3501 §7.1: without a
    PERMANENTFLAGS code every flag is permanent; with one, "\\*" allows new keywords."""
    perm = select_info.get(b"PERMANENTFLAGS")
    if perm is None:
        return True
    names = {(f.decode() if isinstance(f, bytes) else str(f)).lower() for f in perm}
    return "\\*" in names


def keyword_finding(select_info: Mapping[bytes, Any], account: AccountConfig, mailbox: str) -> Finding:
    subject = f"[{account.name}] watched mailbox {mailbox!r} keywords"
    if keywords_allowed(select_info):
        return Finding(OK, subject, "new keywords may be set")
    perm = sorted((f.decode() if isinstance(f, bytes) else str(f)) for f in select_info.get(b"PERMANENTFLAGS", ()))
    return Finding(
        FAIL, subject, f"the server does not allow new keywords (PERMANENTFLAGS {perm} lacks \\*)",
        f"set accounts[{account.name!r}].action = \"move\"",
    )


def watched_mailboxes(client: Any, account: AccountConfig, mailboxes: Iterable[str] | None = None) -> list[Finding]:
    """Each watched mailbox exists and can be selected; for action = "keyword" it takes new
    keywords. Selected read-write like `serve` does (a read-only EXAMINE reports no permanent flags)."""
    where = f"[{account.name}]"
    existing = {name for _flags, _delim, name in client.list_folders()}
    out: list[Finding] = []
    for mailbox in (account.mailboxes if mailboxes is None else mailboxes):
        subject = f"{where} watched mailbox {mailbox!r}"
        try:
            server = server_folder(client, mailbox)
        except MailboxError as exc:
            out.append(Finding(FAIL, subject, str(exc).removeprefix(f"folder {mailbox!r}: "),
                               f"change accounts[{account.name!r}].mailboxes"))
            continue
        if server != mailbox:
            subject += f" (on the server: {server!r})"
        if server not in existing:
            out.append(Finding(
                FAIL, subject, "missing",
                f"fix accounts[{account.name!r}].mailboxes; existing folders: {sorted(existing)}",
            ))
            continue
        writable = account.action == "keyword" and not account.dry_run
        try:
            info = client.select_folder(server, readonly=not writable)
        except Exception as exc:  # noqa: BLE001
            out.append(Finding(FAIL, subject, f"exists but cannot be selected: {exc}", "check the user's rights on it"))
            continue
        out.append(Finding(OK, subject, f"exists, {int(info.get(b'EXISTS', 0))} message(s)"))
        if writable:
            out.append(keyword_finding(info, account, mailbox))
        if client.has_capability("UNSELECT"):
            client.unselect_folder()
        else:
            client.close_folder()
    return out


def for_serve(client: Any, account: AccountConfig, config: Config) -> list[Finding]:
    """What the watcher checks on every connect before acting (the watched mailbox's keyword rule
    is checked on its own SELECT, with ``keyword_finding``)."""
    out = capabilities(client.has_capability, account)
    if account.action in FILING_ACTIONS:
        fails = [f for f in folders(client, account, config) if f.status == FAIL]
        missing = [f for f in fails if f.detail.startswith("missing")]
        out.extend(f for f in fails if f not in missing)  # a name this server cannot hold: says what to write
        if missing:  # one finding for all, in the words the service log has always used
            names = sorted({f.folder for f in missing if f.folder})
            ns = namespace_of(client)
            spelled = "" if ns == Namespace() else f" ({ns.describe()})"
            out.append(Finding(
                FAIL, f"[{account.name}] folders",
                f"folder(s) {names} do not exist on account {account.name!r}{spelled}: mail cannot be filed there",
                "create them in the mail server, run `mailtriage check --create-folders`, "
                "or fix [categories] / unsure_folder",
            ))
    return out


def raise_failures(findings: Iterable[Finding]) -> None:
    """One MailboxError (permanent: retrying cannot help) naming every FAIL, with its fix."""
    fails = [f for f in findings if f.status == FAIL]
    if fails:
        raise MailboxError("; ".join(f.line().split("  ", 1)[1] for f in fails), transient=False)

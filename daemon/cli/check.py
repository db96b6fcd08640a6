"""`mailtriage check`: every precondition of `serve`, checked up front, one line each with a fix.

Connects and logs in to each account, reads its capabilities, checks (or creates) the category and
unsure folders and the watched mailboxes, checks that the state directory is writable and that the
model loads with the configured labels. Exit status 0 when nothing FAILed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog

from mailtriage.config import AccountConfig, Config
from mailtriage.credentials import secret_file_exposure
from mailtriage.imap import preflight
from mailtriage.imap.preflight import FAIL, OK, WARN, Finding
from mailtriage.cli import check_smtp
from mailtriage.errors import StateError
from mailtriage.store.state import StateDB, state_path_problem

log = structlog.get_logger(__name__)

CheckResult = Finding  # one finding line of the report


class _Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.results: list[Finding] = []

    def add(self, status: str, subject: str, detail: str, fix: str = "") -> Finding:
        return self.extend([Finding(status, subject, detail, fix)])[0]

    def extend(self, findings: list[Finding]) -> list[Finding]:
        for result in findings:
            self.results.append(result)
            print(result.line(), file=self.out, flush=True)
        return findings

    @property
    def failed(self) -> bool:
        return any(r.status == FAIL for r in self.results)


def _check_exposure(report: _Report, account: AccountConfig) -> None:
    """Secrets others may read, and connections others may read or impersonate."""
    where = f"[{account.name}]"
    for key in ("password_file", "oauth_token_file"):
        path = getattr(account, key)
        problem = path and secret_file_exposure(path)
        if problem:
            report.add(
                FAIL if problem.startswith(("world", "accessible to other")) else WARN,
                f"{where} {key}", f"{path!r} is {problem}: other local users can read the mail password",
                f"chmod 600 {path} (owned by the service user), or use password_credential",
            )
    if account.tls == "none":
        report.add(
            WARN, f"{where} tls", "\"none\": the password and all mail cross the network in clear text",
            f"set accounts[{account.name!r}].tls = \"implicit\" (port 993) or \"starttls\"; "
            "\"none\" is only safe to 127.0.0.1",
        )
    elif not account.verify_tls:
        report.add(
            WARN, f"{where} verify_tls", "false: any server can pose as this one and receive the password",
            "set verify_tls = true, with ca_file = the server's CA if it is self-signed",
        )


def _check_account(report: _Report, account: AccountConfig, config: Config, create: bool, connect: Callable[[AccountConfig], Any]) -> None:
    where = f"[{account.name}]"
    _check_exposure(report, account)
    try:
        client = connect(account)
    except Exception as exc:  # noqa: BLE001 - MailboxError/ConfigError carry the fix in their message
        report.add(FAIL, f"{where} connect {account.host}:{account.port}", str(exc))
        return
    report.add(OK, f"{where} connect {account.host}:{account.port}", f"logged in as {account.username!r} ({account.tls})")
    try:
        # The same rules `serve` applies on connect (imap/preflight.py), so the two never disagree.
        report.extend(preflight.capabilities(client.has_capability, account))
        report.extend(preflight.folders(client, account, config, create=create))
        report.extend(preflight.watched_mailboxes(client, account))
    except Exception as exc:  # noqa: BLE001 - a dropped connection mid-check is itself a finding
        report.add(FAIL, f"{where} IMAP", f"{type(exc).__name__}: {exc}", "check the server log")
    finally:
        try:
            client.logout()
        except Exception:  # noqa: BLE001
            pass
    if account.dry_run:
        report.add(WARN, f"{where} dry_run", "on: decisions are recorded but no mail is touched", "set dry_run = false to file mail")


def _check_writable_dir(report: _Report, subject: str, path: Path, fix: str) -> None:
    # The nearest existing ancestor decides whether the service can create the rest.
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        note = "writable" if probe == path else f"will be created (under writable {str(probe)!r})"
        report.add(OK, subject, f"{str(path)!r} {note}")
    else:
        report.add(FAIL, subject, f"{str(path)!r} is not writable by uid {os.geteuid()} ({str(probe)!r} exists)", fix)


def _check_state(report: _Report, config: Config) -> None:
    path = Path(config.state_path)
    fix = "create the directory and give it to the service user, or change state_path"
    problem = state_path_problem(path)  # what StateDB refuses at `serve` start-up
    if problem:
        report.add(FAIL, "state database", problem, "point state_path at a database file")
        return
    if path.exists():
        if path.stat().st_size:
            try:  # the schema check `serve` runs, read-only: another program's file, a newer version
                StateDB(path, readonly=True).close()
            except StateError as exc:
                report.add(FAIL, "state database", str(exc))
                return
        if os.access(path, os.R_OK | os.W_OK) and os.access(path.parent, os.W_OK):
            report.add(OK, "state database", f"{str(path)!r} writable")
        else:
            report.add(FAIL, "state database", f"{str(path)!r} (or its directory, for the WAL files) is not writable", fix)
        return
    _check_writable_dir(report, "state directory", path.parent, fix)


def _check_model(report: _Report, config: Config) -> None:
    where = config.model.url if config.model.backend == "http" else config.model.path
    try:
        from mailtriage.model import backend

        clf = backend.load(config, probe=False)
        clf.classify(["mailtriage check: a test message"])
    except Exception as exc:  # noqa: BLE001 - ModelError/LabelMismatchError say how to fix
        report.add(FAIL, f"model {where!r}", f"{type(exc).__name__}: {exc}")
        return
    report.add(OK, f"model {where!r}", f"version {clf.version} loads; labels match [categories]")


def _check_milter(report: _Report, config: Config) -> None:
    """[milter] listen address: free to bind, or already served by a milter (the running daemon)."""
    import errno
    import socket

    from mailtriage.milter import protocol as p

    host, port = config.milter.listen_host, config.milter.listen_port
    subject = f"milter {host}:{port}"
    fix = "pick a free [milter] listen_port and the same port in Postfix's smtpd_milters (inet:HOST:PORT)"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        report.add(OK, subject, "free to listen on; Postfix: smtpd_milters = inet:"
                   f"{host}:{port}, milter_default_action = {config.milter.on_error}, milter_protocol = 6")
        return
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            report.add(FAIL, subject, f"cannot listen: {exc.strerror or exc}", fix)
            return
    try:  # taken: by a milter that negotiates (mailtriage serve already running) or by something else?
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.sendall(p.optneg(p.OptNeg(p.VERSION, p.ACTIONS, p.WANTED_STEPS)))
            answer = sock.recv(4 + 13)
        packets, _rest = p.split_packets(answer)
        if packets and packets[0][0] == p.SMFIC_OPTNEG:
            report.add(OK, subject, "in use by a milter that negotiates (mailtriage serve is running?)")
            return
    except (OSError, p.ProtocolError):
        pass
    report.add(FAIL, subject, "in use by something that does not speak the milter protocol", fix)


def _check_smtp(report: _Report, config: Config, rcpt: str) -> None:
    """[smtp]: the listen address, then the next hop's EHLO, MAIL FROM:<> and RCPT (never DATA)."""
    report.extend([check_smtp.listen(config.smtp)])
    report.extend(check_smtp.next_hop(config.smtp, rcpt))


def _check_web(report: _Report, config: Config) -> None:
    """[web]: who can sign in, and where the console listens (it is meant to sit behind a TLS proxy)."""
    import ipaddress

    from mailtriage.errors import ConfigError
    from mailtriage.web.auth import read_password_file
    from mailtriage.web.server import bind

    web = config.web
    subject = f"web console {web.listen_host}:{web.listen_port}"
    if web.password_file:
        try:
            users = read_password_file(web.password_file)
            report.add(OK, "web password_file", f"{len(users)} user(s): {', '.join(sorted(users))}")
        except ConfigError as exc:
            report.add(FAIL, "web password_file", str(exc))
    if web.trusted_user_header:
        report.add(WARN, "web trusted_user_header", f"{web.trusted_user_header!r} signs in whoever it names when "
                   f"sent from {list(web.trusted_proxies)}", "make sure the reverse proxy overwrites the header "
                   "a client sends (docs/INSTALL.md, section 10)")
    try:
        bind(web.listen_host, web.listen_port).close()
        report.add(OK, subject, "free to listen on" + ("" if web.allow_actions else "; read-only (allow_actions = false)"))
    except ConfigError as exc:
        report.add(WARN, subject, f"{exc} (fine if `mailtriage serve` is running and serves it)")
    try:
        loopback = ipaddress.ip_address(web.listen_host).is_loopback
    except ValueError:
        loopback = web.listen_host == "localhost"
    if not loopback:
        report.add(WARN, subject, "reachable from other hosts without TLS",
                   "listen on 127.0.0.1 and put nginx or Apache with TLS in front (docs/INSTALL.md, section 10)")


def _check_intakes(report: _Report, config: Config) -> None:
    """Which intakes `serve` runs. A relay- or milter-only set-up watches no mailbox, and that is fine."""
    intakes = [f"IMAP watcher ({len(config.accounts)} account(s))"] if config.accounts else []
    if config.smtp.enabled:
        intakes.append(f"SMTP content filter on {config.smtp.listen_host}:{config.smtp.listen_port}")
    if config.milter.enabled:
        intakes.append(f"milter on {config.milter.listen_host}:{config.milter.listen_port}")
    if not intakes:
        # A WARN, as before: `check` also vets a model or state path before any intake is written.
        report.add(WARN, "intakes", "none: no [[accounts]], [smtp] enabled = false, [milter] enabled = false; "
                   "`serve` refuses to start with nothing to do",
                   "add an [[accounts]] table (IMAP), or set enabled = true in [smtp] (content filter) or [milter]")
        return
    watched = "" if config.accounts else "; no [[accounts]]: no mailbox is watched"
    report.add(OK, "intakes", ", ".join(intakes) + watched)


def run_check(
    config: Config,
    create_folders: bool = False,
    out: TextIO | None = None,
    *,
    connect: Callable[[AccountConfig], Any] | None = None,
    check_model: bool = True,
    rcpt: str = check_smtp.DEFAULT_RECIPIENT,
) -> int:
    """Run every check, printing one line each; 0 when none FAILed, else 1. ``rcpt``: the address
    the SMTP next hop is asked to accept (RCPT only; no mail is sent)."""
    if connect is None:
        from mailtriage.imap.connection import connect as imap_connect

        connect = imap_connect
    out = out if out is not None else sys.stdout  # looked up now: a test (or caller) may have swapped it
    report = _Report(out)
    for account in config.accounts:
        _check_account(report, account, config, create_folders, connect)
    if config.smtp.enabled:
        _check_smtp(report, config, rcpt)
    if config.milter.enabled:
        _check_milter(report, config)
    _check_intakes(report, config)
    if config.web.enabled:
        _check_web(report, config)
    _check_state(report, config)
    if config.training.schedule:
        _check_writable_dir(
            report, "training model_dir", Path(config.training.model_dir),
            "give the service user write access to training.model_dir, or set training.schedule = \"\"",
        )
    if check_model:
        _check_model(report, config)
    fails = sum(r.status == FAIL for r in report.results)
    warns = sum(r.status == WARN for r in report.results)
    print(f"{'FAILED' if fails else 'OK'}: {fails} failure(s), {warns} warning(s)", file=out, flush=True)
    return 1 if report.failed else 0

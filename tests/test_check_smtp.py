"""`mailtriage check` on relay- and milter-only configs, against real servers on 127.0.0.1: an
aiosmtpd next hop that accepts, refuses a recipient or is not there, a listen port another process
holds; and the IDLE line, which may only claim what check measured."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailtriage.cli.check import run_check
from mailtriage.config import AccountConfig, Config, MilterConfig, SmtpConfig, TrainingConfig
from mailtriage.testing.imapserver import free_port

pytestmark = pytest.mark.component

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}


def _config(tmp_path: Path, listen_port: int, next_hop_port: int, **extra: Any) -> Config:
    return Config(
        categories=CATEGORIES, state_path=str(tmp_path / "state.sqlite3"), training=TrainingConfig(schedule=""),
        smtp=SmtpConfig(enabled=True, listen_port=listen_port, next_hop_port=next_hop_port), **extra,
    )


def _run(config: Config, **kwargs: Any) -> tuple[int, list[str]]:
    out = io.StringIO()
    rc = run_check(config, out=out, check_model=False, **kwargs)
    return rc, out.getvalue().splitlines()


def _line(lines: list[str], needle: str) -> str:
    found = [line for line in lines if needle in line]
    assert found, f"no line with {needle!r} in:\n" + "\n".join(lines)
    return found[0]


class Hop:
    """The next hop: records every command it hears; refuses RCPT with ``rcpt_reply`` when set."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.rcpt_reply: str | None = None

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        self.commands.append("EHLO")
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.commands.append(f"MAIL {address}")
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.commands.append(f"RCPT {address}")
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("RSET")
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("DATA")
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("QUIT")
        return "221 Bye"


@pytest.fixture
def hop() -> Iterator[tuple[Hop, int]]:
    handler = Hop()
    port = free_port()  # aiosmtpd's Controller cannot start on port 0
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="nexthop.test",
                            enable_SMTPUTF8=True)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def test_relay_only_with_a_real_next_hop_is_ok_and_sends_no_mail(tmp_path: Path, hop: tuple[Hop, int]) -> None:
    handler, hop_port = hop
    listen = free_port()
    rc, lines = _run(_config(tmp_path, listen, hop_port))
    assert rc == 0, "\n".join(lines)
    assert not any("none configured" in line for line in lines)  # a relay-only set-up is not a mistake
    intakes = _line(lines, "intakes")
    assert intakes.startswith("OK") and f"SMTP content filter on 127.0.0.1:{listen}" in intakes
    assert "no mailbox is watched" in intakes
    assert _line(lines, f"smtp listen 127.0.0.1:{listen}").startswith("OK")
    assert f"content_filter = mailtriage:[127.0.0.1]:{listen}" in _line(lines, "smtp listen")
    assert _line(lines, f"smtp next hop 127.0.0.1:{hop_port} EHLO").startswith("OK")
    rcpt = _line(lines, "RCPT TO:<postmaster>")
    assert rcpt.startswith("OK") and "no DATA sent" in rcpt
    # The probe: EHLO, the null sender, one recipient, then RSET and QUIT; never DATA.
    assert handler.commands == ["EHLO", "MAIL <>", "RCPT postmaster", "RSET", "QUIT"]


def test_check_command_asks_the_next_hop_for_the_given_address(
    tmp_path: Path, hop: tuple[Hop, int], capsys: pytest.CaptureFixture[str]
) -> None:
    from mailtriage.cli.main import main

    handler, hop_port = hop
    conf = tmp_path / "config.toml"
    conf.write_text(
        f'state_path = "{tmp_path / "state.sqlite3"}"\n[training]\nschedule = ""\n'
        f'[smtp]\nenabled = true\nlisten_port = {free_port()}\nnext_hop_port = {hop_port}\n'
        '[categories]\nbilling = "Support/Billing"\nlogin = "Support/Login"\n'
    )
    assert main(["check", "--config", str(conf), "--rcpt", "team@example.com"]) == 1  # no model at the default path
    assert "RCPT team@example.com" in handler.commands and "DATA" not in handler.commands
    assert _line(capsys.readouterr().out.splitlines(), "RCPT TO:<team@example.com>").startswith("OK")


def test_nothing_on_the_next_hop_port_fails_with_the_postfix_hint(tmp_path: Path) -> None:
    hop_port = free_port()  # bound, then released: nothing listens there
    rc, lines = _run(_config(tmp_path, free_port(), hop_port))
    assert rc == 1
    line = _line(lines, f"smtp next hop 127.0.0.1:{hop_port}")
    assert line.startswith("FAIL") and "connection refused" in line
    assert f"the reinjection listener 127.0.0.1:{hop_port} from docs/postfix/master.cf is missing" in line
    assert "postfix reload" in line


@pytest.mark.parametrize(("reply", "status"), [("550 5.1.1 <postmaster>: Recipient address rejected", "FAIL"),
                                               ("450 4.7.1 try again later", "WARN")])
def test_a_hop_that_refuses_rcpt_is_reported_with_its_reply(
    tmp_path: Path, hop: tuple[Hop, int], reply: str, status: str
) -> None:
    handler, hop_port = hop
    handler.rcpt_reply = reply
    rc, lines = _run(_config(tmp_path, free_port(), hop_port))
    assert rc == (1 if status == "FAIL" else 0), "\n".join(lines)
    line = _line(lines, "RCPT TO:<postmaster>")
    assert line.startswith(status) and reply in line
    assert "smtpd_recipient_restrictions=permit_mynetworks" in line  # the Postfix side of the fix
    assert "DATA" not in handler.commands


def test_next_hop_that_is_our_own_listen_address_fails(tmp_path: Path) -> None:
    port = free_port()
    rc, lines = _run(_config(tmp_path, port, port))
    assert rc == 1 and "loop back into mailtriage" in _line(lines, "smtp next hop")


def test_listen_port_held_by_another_process_fails(tmp_path: Path, hop: tuple[Hop, int]) -> None:
    _handler, hop_port = hop
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import socket, sys\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
         "print(s.getsockname()[1], flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())  # printed once it listens
        rc, lines = _run(_config(tmp_path, port, hop_port))
    finally:
        holder.communicate("", timeout=10)
    assert rc == 1
    line = _line(lines, f"smtp listen 127.0.0.1:{port}")
    assert line.startswith("FAIL") and "does not greet like an SMTP server" in line and "listen_port" in line


def test_listen_port_held_by_another_smtp_server_fails_but_our_running_filter_is_ok(
    tmp_path: Path, hop: tuple[Hop, int]
) -> None:
    from mailtriage.smtp.relay import SmtpFilter

    _handler, hop_port = hop
    # Another SMTP server (the next hop itself) on the listen port: Postfix's smtpd there, say.
    rc, lines = _run(_config(tmp_path, hop_port, free_port()))
    line = _line(lines, f"smtp listen 127.0.0.1:{hop_port}")
    assert rc == 1 and line.startswith("FAIL") and "another SMTP server" in line and "nexthop.test" in line

    # mailtriage serve's own filter on it: that is the running service, not a conflict.
    config = _config(tmp_path, free_port(), hop_port)
    started, stop = threading.Event(), threading.Event()
    ports: list[int] = []

    async def serve_filter() -> None:
        async def classify(texts: Any) -> Any:
            raise AssertionError("check must not send mail")

        server = SmtpFilter(config, classify, port=0, hostname="relay.test")
        await server.start()
        ports.append(server.port)
        started.set()
        await asyncio.to_thread(stop.wait)
        await server.close(grace=1)

    thread = threading.Thread(target=asyncio.run, args=(serve_filter(),), daemon=True)
    thread.start()
    try:
        assert started.wait(30)
        rc, lines = _run(_config(tmp_path, ports[0], hop_port))
    finally:
        stop.set()
        thread.join(30)
    line = _line(lines, f"smtp listen 127.0.0.1:{ports[0]}")
    assert rc == 0 and line.startswith("OK") and "mailtriage serve is running" in line, "\n".join(lines)


def test_milter_only_config_names_its_intake(tmp_path: Path) -> None:
    config = Config(categories=CATEGORIES, state_path=str(tmp_path / "state.sqlite3"),
                    training=TrainingConfig(schedule=""), milter=MilterConfig(enabled=True, listen_port=free_port()))
    rc, lines = _run(config)
    assert rc == 0, "\n".join(lines)
    assert not any("none configured" in line or line.startswith("WARN") for line in lines), "\n".join(lines)
    assert "milter on 127.0.0.1:" in _line(lines, "intakes")


def test_nothing_configured_says_serve_has_nothing_to_do(tmp_path: Path) -> None:
    config = Config(categories=CATEGORIES, state_path=str(tmp_path / "state.sqlite3"),
                    training=TrainingConfig(schedule=""))
    _rc, lines = _run(config)
    line = _line(lines, "intakes")
    assert line.startswith("WARN") and "nothing to do" in line and "[smtp]" in line


def test_idle_line_claims_no_latency_it_did_not_measure(
    dovecot: Any, imap_user: tuple[str, str], tmp_path: Path
) -> None:
    """check writes no mail, so it cannot know how soon the server reports new mail in IDLE (one
    server reported it only at its own 60 s poll): the line says IDLE is advertised, nothing more."""
    user, password = imap_user
    pw = tmp_path / "pw"
    pw.write_text(password)
    pw.chmod(0o600)
    account = AccountConfig(name="support", host=dovecot.host, port=dovecot.port, tls="none", username=user,
                            password_file=str(pw))
    config = Config(categories=CATEGORIES, state_path=str(tmp_path / "state.sqlite3"),
                    training=TrainingConfig(schedule=""), accounts=(account,))
    _rc, lines = _run(config)
    line = _line(lines, "] IDLE")
    assert line.startswith("OK") and "advertised (not measured)" in line
    assert not re.search(r"within|seconds|immediately|instant|real[- ]time", line), line


@pytest.mark.parametrize("with_reinjection", [True, False])
def test_against_real_postfix_with_the_recipe_and_without_its_reinjection_listener(
    tmp_path: Path, with_reinjection: bool
) -> None:
    """The README's recipe (docs/postfix/) applied to a real Postfix: its reinjection listener answers
    check's probe; with that entry left out of master.cf, check names it and how to add it."""
    import os

    from mailtriage.testing.postfix import Postfix, PostfixError, SmtpSink

    def drop_reinjection(name: str, text: str) -> str:
        if name != "master.cf" or with_reinjection:
            return text
        head, sep, tail = text.partition("127.0.0.1:10026 inet")
        assert sep, "the recipe no longer has the reinjection listener on 127.0.0.1:10026"
        return head + "\n".join("#" + line for line in (sep + tail).splitlines()) + "\n"

    sink = SmtpSink().start()
    postfix = Postfix(sink.port, recipe_edit=drop_reinjection)
    try:
        try:
            postfix.start()
        except PostfixError as exc:
            if os.geteuid() != 0:
                pytest.skip(str(exc))  # Postfix's master runs only as root
            raise
        rc, lines = _run(_config(tmp_path, postfix.filter_port, postfix.reinject_port))
        queued = postfix.queue()
    finally:
        postfix.stop()
        sink.stop()
    hop = f"smtp next hop 127.0.0.1:{postfix.reinject_port}"
    if with_reinjection:
        assert rc == 0, "\n".join(lines)
        assert _line(lines, f"{hop} EHLO").startswith("OK")
        assert _line(lines, f"{hop} RCPT TO:<postmaster>").startswith("OK")
        assert queued == [] and sink.received == []  # the probe queued and delivered nothing
    else:
        line = _line(lines, hop)
        assert rc == 1 and line.startswith("FAIL") and "connection refused" in line
        assert f"reinjection listener 127.0.0.1:{postfix.reinject_port} from docs/postfix/master.cf" in line

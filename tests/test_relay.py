"""The SMTP content filter against real servers on 127.0.0.1: smtplib -> relay -> aiosmtpd next hop.

The model is a keyword fake (pure logic) except in one test with the real tiny model; the SMTP
behaviour we promise (headers, 451 on every failure before the next hop accepted, the next hop's
5xx passed back) always goes through real sockets.
"""

from __future__ import annotations

import asyncio
import io
import concurrent.futures
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailtriage.model import modeldir
from mailtriage.core.classifier import Prediction
from mailtriage.config import Config, SmtpConfig
from mailtriage.core.labels import LabelSet
from mailtriage.errors import ConfigError
from mailtriage.core.pipeline import ClassifyAsync
from mailtriage.smtp.nexthop import NextHop
from mailtriage.smtp.relay import SmtpFilter
from mailtriage.testing.imapserver import free_port
from mailtriage.testing.loop import LoopThread
from mailtriage.testing.builders import mail, make_config, relay_table
from mailtriage.testing.fakes import KeywordClassifier
from mailtriage.testing.waits import wait_for


CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
LABELS = tuple(CATEGORIES)
KEYWORDS = {"invoice": "billing", "password": "login", "refund": "refunds"}


# -- helpers ------------------------------------------------------------------------------------


def keyword_classifier(version: str = "kw-1") -> KeywordClassifier:
    """Pure-logic stand-in for the model: a keyword gives its label at 0.95, none gives 0.4."""
    return KeywordClassifier(LABELS, KEYWORDS, version=version)


async def keyword_classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
    return keyword_classifier()(texts)


async def broken_classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
    raise RuntimeError("CUDA out of memory")


def relay_config(listen_port: int = 10025, next_hop_port: int = 10026, state_dir: Path | None = None,
                 **settings: Any) -> Config:
    """The relay's config: [smtp] between the two ports, the keyword fake's threshold unless ``model`` is given."""
    settings.setdefault("model", {"threshold": 0.6, "device": "cpu"})
    return make_config(state_dir, categories=CATEGORIES, smtp=relay_table(listen_port, next_hop_port), **settings)


class NextHopHandler:
    """The next hop: stores what it accepts; refuses recipients or DATA on demand."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []
        self.reject_rcpt: dict[str, str] = {}
        self.data_reply: str | None = None  # e.g. "554 5.7.1 spam" instead of accepting
        self.drop_on_data = False

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.reject_rcpt:
            return self.reject_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.drop_on_data:
            raise ConnectionResetError("next hop crashed")  # aiosmtpd closes without a reply
        if self.data_reply:
            return self.data_reply
        self.received.append(envelope)
        return "250 2.0.0 Ok: queued as ABC123"


@pytest.fixture
def next_hop() -> Iterator[tuple[NextHopHandler, int]]:
    handler = NextHopHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="nexthop.test")
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


class StartRelay:
    """start_relay(classify, next_hop_port, **SmtpFilter kwargs) -> the port the relay listens on."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.servers: dict[int, SmtpFilter] = {}

    def __call__(self, classify: ClassifyAsync, next_hop_port: int, **kwargs: Any) -> int:
        config = relay_config(listen_port=1, next_hop_port=next_hop_port)
        kwargs.setdefault("next_hop", NextHop("127.0.0.1", next_hop_port, timeout=10, local_hostname="relay.test"))
        server = SmtpFilter(config, classify, port=0, hostname="relay.test", **kwargs)
        self.loop.run(server.start())
        self.servers[server.port] = server
        return server.port

    def sessions(self, port: int) -> int:
        """How many client sessions the relay on ``port`` holds now."""
        return len(self.servers[port]._connections)  # noqa: SLF001 - test harness


@pytest.fixture
def start_relay() -> Iterator[StartRelay]:
    loop = LoopThread()
    start = StartRelay(loop)
    try:
        yield start
    finally:
        for server in start.servers.values():
            loop.run(server.close(grace=1))
        loop.stop()


def send(
    port: int, raw: bytes, to: Sequence[str] = ("support@example.com",), sender: str = "customer@example.com"
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        return client.sendmail(sender, list(to), raw)


def headers_of(envelope: Envelope) -> list[tuple[str, str]]:
    assert isinstance(envelope.content, bytes)
    fields = message_from_bytes(envelope.content).items()
    return [(k, str(v)) for k, v in fields if k.lower().startswith("x-mailtriage")]


# -- the happy path -------------------------------------------------------------------------------


@pytest.mark.component
def test_message_relayed_with_headers_and_forged_ones_removed(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    # Forged by the sender, one of them folded over two lines: both must go.
    forged = b"X-Mailtriage-Category: refunds\r\nX-MAILTRIAGE-Confidence: 1.0000\r\n\tfolded\r\n"
    raw = forged + mail("Where is my invoice for March?")
    with structlog.testing.capture_logs() as logs:
        assert send(port, raw) == {}
        assert send(port, mail("hello there", subject="hi")) == {}  # no keyword: below threshold

    assert len(hop.received) == 2
    first, second = hop.received
    assert first.mail_from == "customer@example.com"
    assert first.rcpt_tos == ["support@example.com"]
    assert headers_of(first) == [("X-Mailtriage-Category", "billing"), ("X-Mailtriage-Confidence", "0.9500")]
    assert headers_of(second) == [("X-Mailtriage-Category", "unsure"), ("X-Mailtriage-Confidence", "0.4000")]
    # The rest of the message is passed on byte for byte, only the forged fields are gone.
    assert isinstance(first.content, bytes)
    assert first.content.endswith(raw.split(b"\r\n\r\n", 1)[1])
    assert b"folded" not in first.content and b"refunds" not in first.content
    relayed = [e for e in logs if e["event"] == "smtp_relayed"]
    assert [(e["category"], e["model"]) for e in relayed] == [("billing", "kw-1"), ("unsure", "kw-1")]
    assert "ABC123" in relayed[0]["next_hop_reply"]


@pytest.mark.component
def test_multiple_recipients_and_a_null_sender(next_hop: tuple[NextHopHandler, int], start_relay: StartRelay) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    rcpts = ["a@example.com", "b@example.com", "c@example.com"]
    assert send(port, mail("refund please"), to=rcpts, sender="") == {}
    [env] = hop.received
    assert env.rcpt_tos == rcpts
    assert env.mail_from == "<>"  # a bounce stays a bounce
    assert headers_of(env)[0] == ("X-Mailtriage-Category", "refunds")


@pytest.mark.component
def test_reset_and_abandoned_transactions_relay_nothing(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        assert client.mail("customer@example.com")[0] == 250
        assert client.rcpt("a@example.com")[0] == 250
        assert client.rset()[0] == 250
        assert client.sendmail("customer@example.com", ["b@example.com"], mail("invoice")) == {}
        assert client.mail("customer@example.com")[0] == 250
        assert client.rcpt("c@example.com")[0] == 250
    # ... and the client went away mid-transaction (QUIT then close): that one is dropped too.
    assert wait_for(lambda: start_relay.sessions(port) == 0)  # the relay has let go of the session
    assert [env.rcpt_tos for env in hop.received] == [["b@example.com"]]


# -- next hop refusals are passed back, failures become 451 ----------------------------------------


@pytest.mark.component
def test_next_hop_5xx_for_one_recipient_is_passed_back_for_that_recipient(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    hop.reject_rcpt["nobody@example.com"] = "550 5.1.1 <nobody@example.com>: Recipient address rejected"
    port = start_relay(keyword_classify, hop_port)
    refused = send(port, mail("password reset"), to=["support@example.com", "nobody@example.com"])
    assert refused == {"nobody@example.com": (550, b"5.1.1 <nobody@example.com>: Recipient address rejected")}
    [env] = hop.received
    assert env.rcpt_tos == ["support@example.com"]

    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        send(port, mail("password reset"), to=["nobody@example.com"])
    assert info.value.recipients["nobody@example.com"][0] == 550
    assert len(hop.received) == 1


@pytest.mark.component
def test_next_hop_down_gives_451_and_the_retry_delivers(start_relay: StartRelay) -> None:
    hop_port = free_port()  # nothing listens there yet
    port = start_relay(keyword_classify, hop_port)
    raw = mail("invoice copy please")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        send(port, raw)  # MAIL is answered here; the recipient is checked with the next hop
    assert info.value.recipients["support@example.com"][0] == 451  # temporary: the MTA keeps the message

    handler = NextHopHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=hop_port, server_hostname="nexthop.test")
    controller.start()
    try:
        assert send(port, raw) == {}  # the MTA's retry
    finally:
        controller.stop()
    [env] = handler.received
    assert headers_of(env)[0] == ("X-Mailtriage-Category", "billing")


@pytest.mark.component
def test_classifier_failure_gives_451_and_nothing_is_relayed(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(broken_classify, hop_port)
    with structlog.testing.capture_logs() as logs, pytest.raises(smtplib.SMTPDataError) as info:
        send(port, mail("invoice"))
    assert info.value.smtp_code == 451
    assert hop.received == []
    assert any(e["event"] == "smtp_classify_failed" and "CUDA" in e["error"] for e in logs)


async def mismatched_classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
    """A model whose labels are not [categories]: "spam" for everything, "invoice" at 0.95, else 0.4."""
    return KeywordClassifier(("spam", *LABELS), {"invoice": "spam"}, default="spam")(texts)


@pytest.mark.component
@pytest.mark.parametrize("body", ["invoice", "hello there"], ids=["confident", "unsure"])
def test_a_label_that_is_not_a_category_gives_451_and_nothing_is_relayed(
    body: str, next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    # The adapter does not match [categories]: the IMAP watcher refuses to file by it, and so must
    # the relay (before, an unsure prediction of such a label was relayed, tagged "unsure").
    hop, hop_port = next_hop
    port = start_relay(mismatched_classify, hop_port)
    with structlog.testing.capture_logs() as logs, pytest.raises(smtplib.SMTPDataError) as info:
        send(port, mail(body))
    assert info.value.smtp_code == 451
    assert hop.received == []
    failed = [e for e in logs if e["event"] == "smtp_classify_failed"]
    assert [e["error_type"] for e in failed] == ["LabelMismatchError"]
    assert "'spam', which is not a configured category" in failed[0]["error"]


@pytest.mark.component
@pytest.mark.parametrize(
    ("mode", "code"),
    [("554 5.7.1 Message content rejected", 554), ("452 4.3.1 Insufficient system storage", 451), ("drop", 451)],
)
def test_next_hop_answer_to_data(
    mode: str, code: int, next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    if mode == "drop":
        hop.drop_on_data = True
    else:
        hop.data_reply = mode
    port = start_relay(keyword_classify, hop_port)
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(port, mail("refund"))
    assert info.value.smtp_code == code
    if code == 554:
        assert b"Message content rejected" in info.value.smtp_error
    # The session goes on: the next message on a healthy next hop is relayed.
    hop.drop_on_data, hop.data_reply = False, None
    assert send(port, mail("refund")) == {}
    assert len(hop.received) == 1


@pytest.mark.component
def test_unexpected_handler_error_answers_451_not_500(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailtriage.smtp import nexthop

    def boom(self: Any, recipient: str) -> None:
        raise RuntimeError("a bug")

    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    monkeypatch.setattr(nexthop.NextHopTransaction, "rcpt", boom)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        send(port, mail("invoice"))
    assert info.value.recipients["support@example.com"][0] == 451
    assert hop.received == []


@pytest.mark.component
def test_size_limit_is_advertised_and_enforced(next_hop: tuple[NextHopHandler, int], start_relay: StartRelay) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port, data_size_limit=4096)
    big = mail("invoice " * 1000)
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        send(port, big)  # smtplib declares SIZE= when the server advertises it
    assert info.value.smtp_code == 552  # permanent: the message will never fit
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        assert client.esmtp_features.get("size") == "4096"
        assert client.mail("customer@example.com")[0] == 250  # no SIZE=: caught while reading DATA
        assert client.rcpt("support@example.com")[0] == 250
        assert client.data(big)[0] == 552
    assert hop.received == []


# -- hostile input --------------------------------------------------------------------------------


@pytest.mark.component
def test_hostile_message_is_still_relayed(next_hop: tuple[NextHopHandler, int], start_relay: StartRelay) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    junk_headers = b"".join(b"X-Junk-%d: \xff\xfe%s\r\n" % (i, b"=?x-unknown?B?###?=" * 3) for i in range(3000))
    raw = (
        b"From: =?utf-8?Q?broken\r\n"
        + junk_headers
        + b"Subject: =?unknown-8bit?B?////?= refund\r\n"
        b"X-Mailtriage-Category: billing\r\n"
        b"Content-Type: multipart/mixed; boundary=\"never-closed\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n"
        b"--never-closed\r\n"
        b"Content-Type: text/html; charset=x-klingon\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        b"%%%not base64%%%\r\n"
        + b"<a <a <a <b>\xc3\x28\r\n" * 2000
    )
    started = time.monotonic()
    assert send(port, raw) == {}
    assert time.monotonic() - started < 20
    [env] = hop.received
    assert isinstance(env.content, bytes)
    assert env.content.startswith(b"X-Mailtriage-Category: refunds\r\nX-Mailtriage-Confidence: 0.9500\r\n")
    assert env.content.count(b"X-Mailtriage-Category") == 1
    assert env.content.endswith(b"<a <a <a <b>\xc3\x28\r\n")


# -- import hygiene ----------------------------------------------------------------------------------


@pytest.mark.component
def test_importing_the_relay_does_not_import_torch() -> None:
    code = (
        "import sys, mailtriage.smtp.relay\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# -- the real tiny model ------------------------------------------------------------------------------


@pytest.mark.component
def test_relay_with_the_real_tiny_model(
    tiny_model_dir: Path, next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    from mailtriage.model.transformers import load_classifier

    clf = load_classifier(tiny_model_dir, device="cpu", max_length=64, expected_labels=LABELS)
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # like the service's inference thread

    async def classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(worker, clf.classify, list(texts)), clf.version

    hop, hop_port = next_hop
    port = start_relay(classify, hop_port)
    try:
        assert send(port, mail("I cannot login, my password is not accepted", subject="login")) == {}
        assert send(port, mail("hello", subject="hello")) == {}
    finally:
        worker.shutdown()
    login, hello = (dict(headers_of(env)) for env in hop.received)
    assert login["X-Mailtriage-Category"] == "login"
    assert float(login["X-Mailtriage-Confidence"]) > 0.9
    assert hello["X-Mailtriage-Category"] == "unsure"


# -- through the Service: `mailtriage serve` with [smtp] enabled -----------------------------------------


@pytest.mark.component
def test_service_with_smtp_enabled_relays_through_its_inference_worker(
    tmp_path: Path, next_hop: tuple[NextHopHandler, int]
) -> None:
    from mailtriage.service.app import Service

    hop, hop_port = next_hop
    listen = free_port()
    models = tmp_path / "models"
    version = models / "v1"
    version.mkdir(parents=True)
    LabelSet(LABELS).save(version)
    modeldir.promote(models, version)
    config = relay_config(listen, hop_port, tmp_path, model={"path": str(models), "device": "cpu"})
    inference_threads: list[str] = []

    class Recording(KeywordClassifier):
        def __init__(self) -> None:
            super().__init__(LABELS, KEYWORDS, version="v1")

        def classify(self, texts: Sequence[str]) -> list[Prediction]:
            inference_threads.append(threading.current_thread().name)
            return super().classify(texts)

    service = Service(config, None, load_model=lambda path: Recording())

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 10)
        refused = await asyncio.to_thread(send, listen, mail("my invoice is wrong"))
        assert refused == {}
        service.stop()
        await asyncio.wait_for(task, 15)

    asyncio.run(main())
    [env] = hop.received
    assert headers_of(env)[0] == ("X-Mailtriage-Category", "billing")
    # The decision is in the state DB, so `stats` and corrections cover SMTP mail.
    from mailtriage.store import stats as stats_cli
    from mailtriage.store.state import SMTP_INTAKE, StateDB

    [row] = StateDB(config.state_path).rows()
    assert (row.account, row.label, row.action, row.status, row.model_version) == (SMTP_INTAKE, "billing", "header", "done", "v1")
    out = io.StringIO()
    stats_cli.print_stats(config, out=out)
    assert "by intake: IMAP watcher 0, SMTP content filter 1" in out.getvalue()
    assert inference_threads and all(name.startswith("inference") for name in inference_threads)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", listen), timeout=2):
        pass  # stopped with the service


@pytest.mark.component
def test_listen_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    from mailtriage.errors import ConfigError

    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            server = SmtpFilter(relay_config(listen_port=port), keyword_classify, hostname="relay.test")
            with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*listen_port"):
                await server.start()

    asyncio.run(main())


# -- idle and hostile clients cannot lock real mail out ------------------------


def _idle_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _sent(port: int, raw: bytes) -> bool:
    """One delivery attempt: True when accepted for every recipient, False when the relay has no room yet."""
    try:
        assert send(port, raw) == {}
    except smtplib.SMTPConnectError:
        return False
    return True


@pytest.mark.component
def test_connections_beyond_the_limit_get_421_and_idle_ones_time_out(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    limit = 5
    port = start_relay(keyword_classify, hop_port, max_connections=limit, idle_timeout=1.0, session_lifetime=60.0)
    idle = [_idle_client(port) for _ in range(limit)]
    try:
        for sock in idle:
            assert _read_reply(sock).startswith(b"220 ")
        extra = [_idle_client(port) for _ in range(3 * limit)]
        for sock in extra:  # refused at once, not queued behind the idle ones
            assert _read_reply(sock).startswith(b"421 4.7.0")
            assert sock.recv(1) == b""
            sock.close()
        # The idle ones are told 421 and disconnected after idle_timeout; then real mail gets through.
        for sock in idle:
            assert _read_reply(sock).startswith(b"421 4.4.2")
            assert sock.recv(4096) == b""
        assert wait_for(lambda: _sent(port, mail("invoice")), 30, interval=0.2), "the idle clients were never dropped"
    finally:
        for sock in idle:
            sock.close()
    assert len(hop.received) == 1


@pytest.mark.component
def test_noop_does_not_keep_a_session_alive_past_its_lifetime(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port, idle_timeout=30.0, session_lifetime=1.0)
    sock = _idle_client(port)
    try:
        assert _read_reply(sock).startswith(b"220 ")
        deadline = time.monotonic() + 20
        last = b""
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"NOOP\r\n")
            except OSError:
                break
            last = _read_reply(sock)
            if not last.startswith(b"250"):
                break
            time.sleep(0.1)  # a client's pace, not synchronisation
        assert last.startswith(b"421 4.4.2"), last
    finally:
        sock.close()
    assert send(port, mail("refund")) == {}  # a new session works
    assert len(hop.received) == 1


@pytest.mark.component
def test_smtp_limits_are_config_options() -> None:
    with pytest.raises(ConfigError, match="smtp.max_connections"):
        SmtpConfig(max_connections=0)
    with pytest.raises(ConfigError, match="smtp.session_lifetime"):
        SmtpConfig(session_lifetime=0)


@pytest.mark.pure
@pytest.mark.parametrize(
    ("line", "why"),
    [("idle_timeout = nan", r"smtp.idle_timeout = nan: must be a finite number of seconds above 0"),
     ("idle_timeout = inf", r"smtp.idle_timeout = inf: must be a finite"),
     ("session_lifetime = -inf", r"smtp.session_lifetime = -inf: must be a finite"),
     ("session_lifetime = nan", r"smtp.session_lifetime = nan"),
     ("idle_timeout = -5", r"smtp.idle_timeout = -5"),
     ("relay_timeout = 600", r"smtp.relay_timeout = 600.*10 minutes"),
     ("relay_timeout = nan", r"smtp.relay_timeout = nan"),
     ("max_bytes_in_flight = 1000", r"smtp.max_bytes_in_flight = 1000: must hold at least one message"),
     ("max_bytes_in_flight = -1", r"smtp.max_bytes_in_flight = -1")],
)
def test_smtp_durations_and_budget_must_be_sane(tmp_path: Path, line: str, why: str) -> None:
    # TOML reads nan and inf; a NaN idle timeout never fired, inf never ended a session.
    from mailtriage.config import load_config

    path = tmp_path / "mailtriage.toml"
    path.write_text('[categories]\nbilling = "Support/Billing"\nrefunds = "Support/Refunds"\n\n[smtp]\n' + line + "\n")
    with pytest.raises(ConfigError, match=why):
        load_config(path)


# -- reply classes for broken addresses --------------------------------------


@pytest.mark.component
@pytest.mark.parametrize(
    "commands",
    [
        [b"MAIL FROM:<"],
        [b"MAIL FROM:<a\x00b@example.com>"],
        [b"MAIL FROM:<\xff\xfe@example.com>"],
        [b"MAIL FROM:<ok@example.com>", b"RCPT TO:<a\x00@example.com>"],
        [b"MAIL FROM:<ok@example.com>", b"RCPT TO:<\xff@example.com>"],
        [b"MAIL FROM:<ok@example.com>", b"RCPT TO:<"],
    ],
    ids=["unclosed", "nul-sender", "bad-utf8-sender", "nul-rcpt", "bad-utf8-rcpt", "unclosed-rcpt"],
)
def test_broken_addresses_get_5xx_and_nothing_is_forwarded(
    commands: list[bytes], next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    with structlog.testing.capture_logs() as logs, _idle_client(port) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        while reader.readline()[3:4] != b" ":
            pass
        replies = []
        for command in commands:
            sock.sendall(command + b"\r\n")
            replies.append(reader.readline())
    # 501 for the syntax error, 553 5.1.3 (aiosmtpd's "malformed address") for NUL / not UTF-8:
    # permanent either way, never a 451 that makes the sender retry a hopeless address.
    assert replies[-1][:3] in ((b"501",) if commands[-1].endswith(b":<") else (b"501", b"553")), replies
    assert all(r.startswith(b"250") for r in replies[:-1]), replies
    assert not [e for e in logs if e["event"] == "smtp_handler_error"]  # no traceback
    assert hop.received == []


@pytest.mark.component
def test_utf8_address_with_smtputf8_is_still_relayed(
    next_hop: tuple[NextHopHandler, int], start_relay: StartRelay
) -> None:
    hop, hop_port = next_hop
    port = start_relay(keyword_classify, hop_port)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        assert client.sendmail("kundé@example.com", ["support@example.com"], mail("invoice"),
                               mail_options=["SMTPUTF8"]) == {}
    [env] = hop.received
    assert env.mail_from == "kundé@example.com"


@pytest.mark.pure
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 64])
def test_data_stream_in_pieces_is_what_smtplib_sends_at_once(chunk_size: int) -> None:
    # The relay sends a large message in chunks, without smtplib's three whole copies; the bytes
    # on the wire must be the same wherever a chunk or a piece boundary falls.
    from mailtriage.smtp.nexthop import data_stream

    message = b"X-A: 1\r\n\r\n.dot\r\n..two\r\nmid.dot\r\n.\r\n\r\n.x"
    expected = smtplib._quote_periods(message) + b"\r\n.\r\n"  # noqa: SLF001 - the reference
    for split in range(len(message) + 1):
        parts = [message[:split], memoryview(message)[split:]]
        assert b"".join(data_stream(parts, chunk_size)) == expected
    assert b"".join(data_stream([b"a\r\n"], chunk_size)) == b"a\r\n.\r\n"
    assert b"".join(data_stream([b""], chunk_size)) == b"\r\n.\r\n"

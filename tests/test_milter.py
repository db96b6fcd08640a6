"""The milter against a real socket: the MTA side is ``mailtriage.testing.milter.MilterClient``, which
speaks the protocol the way Postfix's milter8 does (tests/test_postfix_milter.py puts a real Postfix
in front of it). The model is the keyword fake (pure logic); the protocol we promise - headers added
on top, forged ones deleted, body untouched, on_error, deadlines, bounds - always goes over TCP.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from mailtriage.config import Config, MilterConfig
from mailtriage.core.classifier import Prediction
from mailtriage.core.labels import LabelSet
from mailtriage.errors import ConfigError
from mailtriage.milter import protocol as p
from mailtriage.core.pipeline import ClassifyAsync
from mailtriage.milter.server import MilterServer
from mailtriage.milter.session import TEMPFAIL_TEXT
from mailtriage.model import modeldir
from mailtriage.service.app import Service
from mailtriage.store.state import MILTER_INTAKE, StateDB
from mailtriage.testing.loop import LoopThread
from mailtriage.testing.builders import mail, make_config
from mailtriage.testing.fakes import KeywordClassifier
from mailtriage.testing.milter import MilterClient, split_message, tag_once
from mailtriage.testing.waits import wait_for
from mailtriage.testing.imapserver import free_port

pytestmark = pytest.mark.component

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
LABELS = tuple(CATEGORIES)
KEYWORDS = {"invoice": "billing", "password": "login", "refund": "refunds"}


def keyword_classifier(version: str = "kw-1") -> KeywordClassifier:
    return KeywordClassifier(LABELS, KEYWORDS, version=version)


async def keyword_classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
    return keyword_classifier()(texts)


async def broken_classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
    raise RuntimeError("CUDA out of memory")


def milter_config(**milter: Any) -> Config:
    """The milter's config: [milter] enabled with ``milter`` keys, the keyword fake's threshold."""
    return make_config(categories=CATEGORIES, model={"threshold": 0.6, "device": "cpu"}, milter={"enabled": True, **milter})


StartMilter = Callable[..., MilterServer]


@pytest.fixture
def start_milter() -> Iterator[StartMilter]:
    """start_milter(classify, config=..., **MilterServer kwargs) -> the running server (port chosen)."""
    loop = LoopThread()
    servers: list[MilterServer] = []

    def start(classify: ClassifyAsync = keyword_classify, config: Config | None = None, **kwargs: Any) -> MilterServer:
        server = MilterServer(config or milter_config(), classify, host="127.0.0.1", port=0, **kwargs)
        loop.run(server.start())
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            loop.run(server.close(grace=1))
        loop.stop()


def body_of(raw: bytes) -> bytes:
    return split_message(raw)[1]


def mailtriage_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in split_message(raw)[0] if n.lower().startswith(b"x-mailtriage-")]


# -- the happy path ---------------------------------------------------------------------------------


def test_tags_on_top_removes_forged_fields_and_never_touches_the_body(start_milter: StartMilter) -> None:
    server = start_milter()
    forged = (b"X-Mailtriage-Category: refunds\r\nX-MAILTRIAGE-Confidence: 1.0000\r\n\tfolded\r\n"
              b"x-mailtriage-category: login\r\n")
    raw = mail("Where is my invoice for March?\r\n" + "x" * 3000 + "\r\n", prepend=forged)
    with structlog.testing.capture_logs() as logs:
        result = tag_once("127.0.0.1", server.port, raw)
    assert result.accepted
    delivered = result.apply(raw)
    assert mailtriage_fields(delivered) == [(b"X-Mailtriage-Category", b"billing"),
                                            (b"X-Mailtriage-Confidence", b"0.9500")]
    assert split_message(delivered)[0][:2] == [(b"X-Mailtriage-Category", b"billing"),
                                               (b"X-Mailtriage-Confidence", b"0.9500")]  # on top
    assert body_of(delivered) == body_of(raw)
    assert not any(m.code == p.SMFIR_REPLBODY for m in result.modifications)
    assert sorted(result.deleted()) == [("X-MAILTRIAGE-Confidence", 1), ("X-Mailtriage-Category", 1),
                                        ("X-Mailtriage-Category", 2)]
    tagged = [e for e in logs if e["event"] == "milter_tagged"]
    assert tagged and tagged[0]["category"] == "billing" and tagged[0]["forged_removed"] == 3


def test_unsure_mail_is_tagged_unsure(start_milter: StartMilter) -> None:
    server = start_milter()
    result = tag_once("127.0.0.1", server.port, mail("hello there", subject="hi"))
    assert result.added() == {"X-Mailtriage-Category": "unsure", "X-Mailtriage-Confidence": "0.4000"}


def test_several_messages_and_an_abort_on_one_connection(start_milter: StartMilter) -> None:
    server = start_milter()
    with MilterClient("127.0.0.1", server.port) as client:
        client.negotiate()
        client.connect_events()
        first = client.message(mail("I need a refund"))
        # Postfix sends ABORT on RSET or when the client leaves mid-message: the next one starts clean.
        client.send(p.command(p.SMFIC_HEADER, b"X-Mailtriage-Category", b"refunds"))
        client.abort()
        second = client.message(mail("forgot my password"))
        client.quit()
    assert first.added()["X-Mailtriage-Category"] == "refunds"
    assert second.added()["X-Mailtriage-Category"] == "login"
    assert second.deleted() == []


def test_an_mta_that_leaves_nothing_out_gets_every_reply(start_milter: StartMilter) -> None:
    # Sendmail-like or older MTAs offer no steps to skip: every event arrives and is answered.
    server = start_milter()
    with MilterClient("127.0.0.1", server.port, steps=0) as client:
        assert client.negotiate().steps == 0
        client.connect_events()
        result = client.message(mail("invoice please"))
        client.quit()
    assert result.added()["X-Mailtriage-Category"] == "billing"


def test_version_2_mta_gets_appended_headers(start_milter: StartMilter) -> None:
    server = start_milter()
    with MilterClient("127.0.0.1", server.port, version=2, steps=p.SMFIP_NOCONNECT) as client:
        assert client.negotiate().version == 2
        result = client.message(mail("invoice please"))
        client.quit()
    assert {m.code for m in result.modifications} == {p.SMFIR_ADDHEADER}


# -- trouble: on_error, deadlines ---------------------------------------------------------------------


def test_model_trouble_tempfails_by_default(start_milter: StartMilter) -> None:
    server = start_milter(broken_classify)
    with structlog.testing.capture_logs() as logs:
        result = tag_once("127.0.0.1", server.port, mail("invoice", prepend=b"X-Mailtriage-Category: refunds\r\n"))
    assert not result.accepted
    assert result.smtp_reply == TEMPFAIL_TEXT
    assert result.modifications == []
    assert any(e["event"] == "milter_classify_failed" and e["on_error"] == "tempfail" for e in logs)


def test_model_trouble_with_on_error_accept_passes_untagged_but_clean(start_milter: StartMilter) -> None:
    server = start_milter(broken_classify, config=milter_config(on_error="accept"))
    raw = mail("invoice", prepend=b"X-Mailtriage-Category: refunds\r\n")
    result = tag_once("127.0.0.1", server.port, raw)
    assert result.accepted
    assert mailtriage_fields(result.apply(raw)) == []  # no forged category gets through, even fail-open


async def mismatched_classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
    """A model whose labels are not [categories]: "spam" for everything, "invoice" at 0.95, else 0.4."""
    return KeywordClassifier(("spam", *LABELS), {"invoice": "spam"}, default="spam")(texts)


@pytest.mark.parametrize("body", ["invoice", "hello there"], ids=["confident", "unsure"])
def test_a_label_that_is_not_a_category_tempfails(body: str, start_milter: StartMilter) -> None:
    # The adapter does not match [categories]: no message may be tagged by it, as the IMAP watcher
    # files none (before, an unsure prediction of such a label was tagged "unsure").
    server = start_milter(mismatched_classify)
    with structlog.testing.capture_logs() as logs:
        result = tag_once("127.0.0.1", server.port, mail(body))
    assert not result.accepted
    assert result.smtp_reply == TEMPFAIL_TEXT
    assert result.modifications == []
    failed = [e for e in logs if e["event"] == "milter_classify_failed"]
    assert [(e["error_type"], e["on_error"]) for e in failed] == [("LabelMismatchError", "tempfail")]


def test_a_label_that_is_not_a_category_with_on_error_accept_passes_untagged(start_milter: StartMilter) -> None:
    server = start_milter(mismatched_classify, config=milter_config(on_error="accept"))
    raw = mail("hello there", prepend=b"X-Mailtriage-Category: refunds\r\n")
    result = tag_once("127.0.0.1", server.port, raw)
    assert result.accepted
    assert mailtriage_fields(result.apply(raw)) == []  # neither tagged "unsure" nor the forged field


def test_a_hung_model_is_answered_within_the_deadline(start_milter: StartMilter) -> None:
    never = threading.Event()

    async def hung(texts: Sequence[str]) -> tuple[list[Prediction], str]:
        while not never.is_set():
            await asyncio.sleep(0.05)  # the scenario: a model that never answers
        raise AssertionError("unreachable")

    server = start_milter(hung, classify_timeout=0.5)
    try:
        with structlog.testing.capture_logs() as logs:
            # The client waits at most 30 s (Postfix would wait milter_content_timeout, 300 s).
            result = tag_once("127.0.0.1", server.port, mail("invoice"), timeout=30)
        assert result.smtp_reply == TEMPFAIL_TEXT
        assert any(e["event"] == "milter_classify_failed" and e["error_type"] == "TimeoutError" for e in logs)
    finally:
        never.set()


def test_config_keeps_the_classify_deadline_below_postfix_content_timeout() -> None:
    with pytest.raises(ConfigError, match="milter_content_timeout"):
        MilterConfig(classify_timeout=300)
    with pytest.raises(ConfigError, match="not a TCP port"):
        MilterConfig(listen_port=0)
    with pytest.raises(ConfigError, match="own port"):
        Config(categories=CATEGORIES, smtp=milter_config().smtp.__class__(enabled=True, listen_port=10027),
               milter=MilterConfig(enabled=True, listen_port=10027))


# -- bounds ---------------------------------------------------------------------------------------------


def test_a_message_over_the_limit_is_classified_on_its_prefix(start_milter: StartMilter) -> None:
    server = start_milter(max_message_size=64 * 1024)
    # The keyword sits beyond the limit: the prefix alone decides (unsure), and the body is skipped.
    late = mail("hello\r\n" + ("filler line\r\n" * 20_000) + "invoice\r\n")
    early = mail("invoice\r\n" + ("filler line\r\n" * 20_000))
    with MilterClient("127.0.0.1", server.port) as client:
        client.negotiate()
        late_result = client.message(late)
        early_result = client.message(early)
        client.quit()
    assert late_result.body_skipped and early_result.body_skipped
    assert late_result.added()["X-Mailtriage-Category"] == "unsure"
    assert early_result.added()["X-Mailtriage-Category"] == "billing"
    assert body_of(early_result.apply(early)) == body_of(early)  # skipping is reading less, not cutting
    wait_for(lambda: server.peak_held, 10)  # the connection's bookkeeping lands when its handler ends
    assert 0 < server.peak_held <= 64 * 1024


def test_connections_over_the_limit_are_closed(start_milter: StartMilter) -> None:
    server = start_milter(max_connections=1)
    with MilterClient("127.0.0.1", server.port) as first:
        first.negotiate()
        with MilterClient("127.0.0.1", server.port) as second:
            assert second.read_until_closed(10) == []
        result = first.message(mail("invoice"))  # the held connection still works
        first.quit()
    assert result.accepted


def test_listen_port_taken_is_a_config_error(start_milter: StartMilter) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MilterServer(milter_config(), keyword_classify, host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="listen_port"):
            asyncio.run(server.start())


# -- the daemon: `serve` starts it, decisions land in the state database and in `stats` -------------------


def test_serve_starts_the_milter_and_records_decisions_for_stats(tmp_path: Path) -> None:
    from mailtriage.store.stats import print_stats

    models = tmp_path / "models"
    version = models / "v1"
    version.mkdir(parents=True)
    LabelSet(LABELS).save(version)
    modeldir.promote(models, version)
    port = free_port()
    config = make_config(tmp_path, categories=CATEGORIES, model={"path": str(models), "device": "cpu", "threshold": 0.6},
                         training={"schedule": "", "model_dir": str(models)}, milter={"enabled": True, "listen_port": port})

    def loader(path: Path) -> KeywordClassifier:
        return KeywordClassifier(LABELS, KEYWORDS, version=path.name)

    service = Service(config, None, load_model=loader)  # no accounts: the milter is the only intake

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        result = await asyncio.to_thread(tag_once, "127.0.0.1", port, mail("please refund me"))
        assert result.added()["X-Mailtriage-Category"] == "refunds"
        service.stop()
        await asyncio.wait_for(task, 20)

    asyncio.run(main())
    state = StateDB(config.state_path)
    rows = [r for r in state.rows() if r.account == MILTER_INTAKE]
    assert [(r.label, r.status, r.model_version) for r in rows] == [("refunds", "done", "v1")]
    stats = state.stats(30)
    assert stats["intakes"] == {"imap": 0, "smtp": 0, "milter": 1}
    out = io.StringIO()
    print_stats(config, out=out)
    assert "by intake: IMAP watcher 0, SMTP content filter 0, milter 1" in out.getvalue()


# -- `mailtriage check` ------------------------------------------------------------------------------------


def _check_lines(config: Config) -> tuple[int, list[str]]:
    from mailtriage.cli.check import run_check

    out = io.StringIO()
    rc = run_check(config, out=out, check_model=False)
    return rc, [line for line in out.getvalue().splitlines() if "milter" in line]


def test_check_milter_port_free_taken_by_our_milter_or_by_something_else(
    start_milter: StartMilter, tmp_path: Path
) -> None:
    def config(port: int) -> Config:
        return make_config(tmp_path, categories=CATEGORIES, training={"schedule": ""},
                           milter={"enabled": True, "listen_port": port})

    rc, lines = _check_lines(config(free_port()))
    assert rc == 0 and "free to listen on" in lines[0] and "smtpd_milters = inet:127.0.0.1:" in lines[0]

    running = start_milter()
    rc, lines = _check_lines(config(running.port))
    assert rc == 0 and "in use by a milter that negotiates" in lines[0]

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        rc, lines = _check_lines(config(other.getsockname()[1]))
    assert rc == 1 and "does not speak the milter protocol" in lines[0]

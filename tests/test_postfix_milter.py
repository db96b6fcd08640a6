"""The README's Postfix milter recipe against a real Postfix: smtplib -> Postfix (smtpd_milters ->
mailtriage's milter server) -> final delivery (an aiosmtpd sink), byte for byte.

The recipe is docs/postfix/main-milter.cf, applied as is by mailtriage.testing.postfix (only its
port changes). The milter is the real server on its own event loop, as tests/test_milter.py starts
it; the classifier is the keyword fake: what is under test is the mail path through Postfix's
milter client and our protocol module, not the model. One test counts (never times) the kernel's
delayed ACKs on that path, in a network namespace of its own.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailtriage.config import Config
from mailtriage.milter.server import ClassifyAsync, MilterServer
from mailtriage.testing.milter import split_message
from mailtriage.testing.postfix import RECIPE_DIR, Delivered, Postfix, PostfixError, SmtpSink, delayed_acks, delayed_acks_in_namespace
from tests.test_milter import LoopThread, broken_classify, keyword_classify, milter_config as make_config
from tests.test_postfix import (
    CATEGORY,
    LONG_LINE,
    dkim_key,  # noqa: F401 - the module-scoped fixture, used by name
    dkim_signed,
    dkim_verifies,
    fields_named,
    mail,
    message_id_of,
)

pytestmark = pytest.mark.component

CONFIDENCE = b"x-mailtriage-confidence"
RECIPE = "main-milter.cf"


def body_of(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[1]


def mailtriage_fields(content: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in split_message(content)[0] if n.lower().startswith(b"x-mailtriage-")]


# -- the pipeline: Postfix with the milter recipe + the milter server + sink -----------------------


@dataclass
class MilterPipeline:
    postfix: Postfix
    sink: SmtpSink
    loop: LoopThread
    config: Config
    classify: ClassifyAsync
    server_options: dict[str, Any] = field(default_factory=dict)
    server: MilterServer | None = None

    def start_milter(self) -> MilterServer:
        """The milter on the port the recipe points Postfix at (also after Postfix found it down)."""
        server = MilterServer(self.config, self.classify, host="127.0.0.1", port=self.postfix.milter_port,
                              **self.server_options)
        self.loop.run(server.start())
        self.server = server
        return server

    def stop_milter(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            self.loop.run(server.close(grace=1))

    def send(self, raw: bytes, to: Sequence[str] = ("support@example.com",),
             sender: str = "customer@example.org") -> None:
        with smtplib.SMTP("127.0.0.1", self.postfix.smtpd_port, local_hostname="client.test", timeout=30) as client:
            assert client.sendmail(sender, list(to), raw) == {}

    def refused(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw`` expecting Postfix to refuse it in the SMTP session: (code, text) it answered."""
        with smtplib.SMTP("127.0.0.1", self.postfix.smtpd_port, local_hostname="client.test", timeout=30) as client:
            try:
                client.sendmail("customer@example.org", ["support@example.com"], raw)
            except smtplib.SMTPRecipientsRefused as exc:
                [(code, text)] = exc.recipients.values()
                return code, text
            except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                return exc.smtp_code, exc.smtp_error
        raise AssertionError("Postfix accepted a message it was expected to refuse")

    def settled(self, count: int) -> list[Delivered]:
        """Wait until Postfix's queue is empty and the sink holds ``count`` transactions. Postfix
        runs the milter before it queues a message, so once the client has its 250 the message is
        queued, and an empty queue after that means it was delivered."""
        self.postfix.wait_queue(lambda queue: not queue, what="an empty queue")
        return self.sink.wait_for(lambda got: len(got) >= count, what=f"{count} transaction(s)")


StartPipeline = Callable[..., MilterPipeline]


@pytest.fixture
def pipeline() -> Iterator[StartPipeline]:
    """pipeline(classify=..., config=..., milter_up=True, default_action=None, **MilterServer kwargs)."""
    loop = LoopThread()
    started: list[tuple[SmtpSink, Postfix, MilterPipeline]] = []

    def start(classify: ClassifyAsync = keyword_classify, config: Config | None = None, *, milter_up: bool = True,
              default_action: str | None = None, **server_options: Any) -> MilterPipeline:
        def edit(name: str, text: str) -> str:
            if default_action is None:
                return text
            edited = text.replace("milter_default_action = tempfail\n", f"milter_default_action = {default_action}\n")
            assert edited != text, f"the recipe's {name} no longer sets milter_default_action = tempfail"
            return edited

        sink = SmtpSink().start()
        postfix = Postfix(sink.port, recipe="milter", recipe_edit=edit)
        p = MilterPipeline(postfix, sink, loop, config or make_config(), classify, server_options)
        started.append((sink, postfix, p))
        try:
            postfix.start()
        except PostfixError as exc:
            if os.geteuid() != 0:
                pytest.skip(str(exc))  # Postfix's master runs only as root: no install can change that
            pytest.fail(str(exc), pytrace=False)  # a missing Postfix fails loudly: CI must run these
        if milter_up:
            p.start_milter()
        return p

    try:
        yield start
    finally:
        for sink, postfix, p in reversed(started):
            p.stop_milter()
            postfix.stop()
            sink.stop()
        loop.stop()


# -- tagged once, forged fields removed, body untouched --------------------------------------------


FORGED = (b"X-Mailtriage-Category: refunds\r\nX-MAILTRIAGE-Confidence: 1.0000\r\n\tfolded\r\n"
          b"x-mailtriage-category: login\r\nX-MailTriage-Category: spam\r\nX-Mailtriage-Note: trust me\r\n")


def test_every_message_tagged_once_forged_fields_removed_body_untouched(pipeline: StartPipeline) -> None:
    p = pipeline()
    sent = [mail("Where is my invoice for March?\n" + "x" * 3000 + "\n", extra_headers=FORGED),
            mail("I forgot my password\n", extra_headers=FORGED.lower()),
            *(mail(f"invoice number {n}\n") for n in range(3)), mail("hello there\n")]
    for raw in sent:
        p.send(raw)

    delivered = p.settled(len(sent))
    assert len(delivered) == len(sent)
    by_id = {message_id_of(raw): raw for raw in sent}
    assert Counter(message_id_of(d.content) for d in delivered) == Counter(list(by_id))
    for d in delivered:
        assert d.rcpt_tos == ("support@example.com",)
        assert len(fields_named(d.content, CATEGORY)) == 1, d.content[:600]
        assert len(fields_named(d.content, CONFIDENCE)) == 1, d.content[:600]
        assert [n.lower() for n, _ in mailtriage_fields(d.content)] == [CATEGORY, CONFIDENCE]
        for forged_value in (b"refunds", b"folded", b"spam", b"trust me"):
            assert forged_value not in d.content.split(b"\r\n\r\n", 1)[0]
        assert body_of(d.content) == body_of(by_id[message_id_of(d.content)])
    categories = Counter(fields_named(d.content, CATEGORY)[0] for d in delivered)
    assert categories == {b"billing": 4, b"login": 1, b"unsure": 1}
    assert p.server is not None and p.server.errors == 0


def test_dkim_signed_mail_with_a_5000_octet_line_verifies_after_delivery(
    pipeline: StartPipeline, dkim_key: tuple[bytes, bytes]  # noqa: F811
) -> None:
    private_key, txt = dkim_key
    signed = dkim_signed(LONG_LINE + "\n", private_key)
    assert len(LONG_LINE) + 2 == 5000 and dkim_verifies(signed, txt)
    p = pipeline()
    p.send(signed)
    [d] = p.settled(1)
    assert fields_named(d.content, CATEGORY) == [b"billing"]
    assert body_of(d.content) == body_of(signed)
    assert dkim_verifies(d.content, txt)


def test_a_message_over_max_message_size_is_delivered_whole_and_tagged(pipeline: StartPipeline) -> None:
    p = pipeline(max_message_size=64 * 1024)
    raw = mail("Your invoice is attached.\n" + "".join(f"line {n:06d} of the statement\n" for n in range(10_000)))
    assert len(raw) > 4 * 64 * 1024
    p.send(raw)
    [d] = p.settled(1)
    assert fields_named(d.content, CATEGORY) == [b"billing"]
    assert body_of(d.content) == body_of(raw)
    assert p.server is not None and p.server.peak_held <= 64 * 1024


# -- trouble: the milter down, the model failing -----------------------------------------------------


def test_milter_down_with_tempfail_postfix_answers_4xx_and_queues_nothing(pipeline: StartPipeline) -> None:
    p = pipeline(milter_up=False)
    raw = mail("invoice while mailtriage is down\n")
    code, text = p.refused(raw)
    assert code == 451 and text.startswith(b"4.7.1"), (code, text)  # what docs/INSTALL.md says the client gets
    assert p.postfix.queue() == []  # refused in the SMTP session: nothing queued, so nothing can bounce

    # The sender's retry, once mailtriage is back, is delivered once and tagged; nothing else arrives.
    p.start_milter()
    p.send(raw)
    [d] = p.settled(1)
    assert fields_named(d.content, CATEGORY) == [b"billing"]
    assert p.postfix.log_lines(r"status=bounced") == []


def test_milter_down_with_accept_postfix_delivers_as_sent(pipeline: StartPipeline) -> None:
    p = pipeline(milter_up=False, default_action="accept")
    raw = mail("invoice while mailtriage is down\n", extra_headers=b"X-Mailtriage-Category: refunds\r\n")
    p.send(raw)
    [d] = p.settled(1)
    # Untagged, and - what README warns about fail-open - with nobody to remove a forged field.
    assert mailtriage_fields(d.content) == [(b"X-Mailtriage-Category", b"refunds")]
    assert body_of(d.content) == body_of(raw)


def test_classifier_failure_with_on_error_tempfail_gives_the_client_4xx(pipeline: StartPipeline) -> None:
    p = pipeline(broken_classify, make_config(on_error="tempfail"))
    code, text = p.refused(mail("invoice"))
    assert code == 451 and b"could not classify" in text, (code, text)
    assert p.postfix.queue() == []
    # A sync point: a mail that gets through proves the refused one is not delivered later.
    p.stop_milter()
    p.classify = keyword_classify
    p.start_milter()
    p.send(mail("invoice, second try"))
    [d] = p.settled(1)
    assert fields_named(d.content, CATEGORY) == [b"billing"]


def test_classifier_failure_with_on_error_accept_delivers_untagged_without_forged_fields(
    pipeline: StartPipeline,
) -> None:
    p = pipeline(broken_classify, make_config(on_error="accept"), default_action="accept")
    raw = mail("invoice\n", extra_headers=FORGED)
    p.send(raw)
    [d] = p.settled(1)
    assert mailtriage_fields(d.content) == []
    assert body_of(d.content) == body_of(raw)


def test_mail_from_the_sendmail_command_goes_through_the_milter_too(pipeline: StartPipeline) -> None:
    # The recipe's non_smtpd_milters: mail submitted locally (pickup -> cleanup) is tagged as well.
    p = pipeline()
    raw = mail("invoice from a local script\n", extra_headers=b"X-Mailtriage-Category: refunds\r\n")
    sendmail = shutil.which("sendmail", path="/usr/sbin:/usr/bin") or "/usr/sbin/sendmail"
    subprocess.run([sendmail, "-C", str(p.postfix.conf_dir), "-f", "customer@example.org", "support@example.com"],
                   input=raw.replace(b"\r\n", b"\n"), check=True, capture_output=True, timeout=30)
    [d] = p.settled(1)
    assert mailtriage_fields(d.content) == [(b"X-Mailtriage-Category", b"billing"),
                                            (b"X-Mailtriage-Confidence", b"0.9500")]
    assert body_of(d.content) == body_of(raw)


# -- no delayed-ACK stall per message ---------------------------------------------------------------

DELAYED_ACK_MESSAGES = 20


def delayed_acks_child() -> None:
    """In a network namespace of its own (so the count is ours alone): Postfix + milter + sink, one
    SMTP session sending DELAYED_ACK_MESSAGES mails; prints how many delayed ACKs that took."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    loop = LoopThread()
    server = MilterServer(make_config(), keyword_classify, host="127.0.0.1", port=0)
    loop.run(server.start())
    sink = SmtpSink().start()
    postfix = Postfix(sink.port, recipe="milter", milter_port=server.port).start()
    try:
        with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, local_hostname="client.test", timeout=30) as client:
            client.sendmail("customer@example.org", ["support@example.com"], mail("warm-up invoice\n"))
            postfix.wait_queue(lambda queue: not queue, what="the warm-up delivered")
            sink.wait_for(lambda got: len(got) == 1)
            before = delayed_acks()
            for n in range(DELAYED_ACK_MESSAGES):
                client.sendmail("customer@example.org", ["support@example.com"], mail(f"invoice {n}\n"))
            after = delayed_acks()
        sink.wait_for(lambda got: len(got) == 1 + DELAYED_ACK_MESSAGES)
    finally:
        postfix.stop()
        sink.stop()
        loop.run(server.close(grace=1))
        loop.stop()
    print(f"DELAYED_ACKS {after - before}", flush=True)


def test_postfix_packets_that_want_no_answer_are_acknowledged_at_once() -> None:
    # Postfix writes macros and headers one small write each, with Nagle's algorithm on: each waits
    # for the ACK of the one before. Had the milter's socket kept the kernel's delayed ACKs (40 ms),
    # every message would wait for that timer once or twice (counted here, not timed).
    count = delayed_acks_in_namespace("tests.test_postfix_milter:delayed_acks_child", Path(__file__).resolve().parents[1])
    if count is None:
        pytest.skip("needs root, unshare and ip: the count is taken in a network namespace of its own")
    # Without quick ACKs: about two per message; with them: none (a few allowed for Postfix's own chatter).
    assert count < DELAYED_ACK_MESSAGES // 2, count


# -- the docs show the file the tests apply ------------------------------------------------------------


def test_readme_and_install_show_the_milter_recipe_verbatim() -> None:
    repo = Path(__file__).resolve().parents[1]
    text = (RECIPE_DIR / RECIPE).read_text()
    for doc in ("README.md", "docs/INSTALL.md"):
        assert f"```\n{text}```" in (repo / doc).read_text(), f"{doc} does not show docs/postfix/{RECIPE} verbatim"

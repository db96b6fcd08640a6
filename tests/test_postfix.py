"""The README's Postfix content-filter recipe against a real Postfix: smtplib -> Postfix -> mailtriage
-> Postfix (reinjection) -> final delivery (an aiosmtpd sink), byte for byte.

The recipe is docs/postfix/{main,master}.cf, applied as is by mailtriage.testing.postfix (only its
ports change). The classifier is the keyword fake: what is under test is the mail path through
Postfix and the relay, not the model.
"""

from __future__ import annotations

import base64
import email.utils
import os
import re
import smtplib
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailtriage.smtp.nexthop import NextHop
from mailtriage.smtp.relay import SmtpFilter
from mailtriage.testing.postfix import RECIPE_DIR, Delivered, Postfix, PostfixError, SmtpSink, delayed_acks, delayed_acks_in_namespace
from mailtriage.testing.builders import mail as build_mail
from tests.test_relay import LoopThread, keyword_classify, relay_config

pytestmark = pytest.mark.component

CATEGORY = b"x-mailtriage-category"
DKIM_DOMAIN = b"example.org"
DKIM_SELECTOR = b"test"


# -- the pipeline: Postfix + mailtriage + sink ----------------------------------------------------


class Relay:
    """mailtriage's SMTP content filter (keyword fake model) on its own loop; stoppable, restartable."""

    def __init__(self, port: int, next_hop_port: int) -> None:
        self.port = port
        self.next_hop_port = next_hop_port
        self._loop = LoopThread()
        self._server: SmtpFilter | None = None

    def start(self) -> None:
        config = relay_config(listen_port=self.port, next_hop_port=self.next_hop_port)
        server = SmtpFilter(config, keyword_classify, port=self.port, hostname="mailtriage.test",
                            next_hop=NextHop("127.0.0.1", self.next_hop_port, timeout=10,
                                             local_hostname="mailtriage.test"))
        self._loop.run(server.start())
        self._server = server

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            self._loop.run(server.close(grace=1))

    def close(self) -> None:
        self.stop()
        self._loop.stop()


@dataclass
class Pipeline:
    postfix: Postfix
    sink: SmtpSink
    relay: Relay

    def send(self, raw: bytes, to: Sequence[str] = ("support@example.com",),
             sender: str = "customer@example.org") -> None:
        with smtplib.SMTP("127.0.0.1", self.postfix.smtpd_port, local_hostname="client.test", timeout=30) as client:
            assert client.sendmail(sender, list(to), raw) == {}

    def settled(self, count: int) -> list[Delivered]:
        """Wait until Postfix's queue is empty and the sink holds ``count`` transactions.

        Postfix answers mailtriage's final dot only once the reinjected copy is queued, so an
        empty queue means every copy was delivered: nothing more can arrive after this.
        """
        self.postfix.wait_queue(lambda queue: not queue, what="an empty queue")
        return self.sink.wait_for(lambda got: len(got) >= count, what=f"{count} transaction(s)")


StartPipeline = Callable[..., Pipeline]


@pytest.fixture
def pipeline() -> Iterator[StartPipeline]:
    """pipeline(virtual_aliases=..., recipe_edit=..., relay_up=True) -> a running Pipeline."""
    started: list[tuple[SmtpSink, Postfix, Relay]] = []

    def start(*, relay_up: bool = True, **postfix_options: Any) -> Pipeline:
        sink = SmtpSink().start()
        postfix = Postfix(sink.port, **postfix_options)
        relay = Relay(postfix.filter_port, postfix.reinject_port)
        started.append((sink, postfix, relay))
        try:
            postfix.start()
        except PostfixError as exc:
            message = str(exc)
        else:
            if relay_up:
                relay.start()
            return Pipeline(postfix, sink, relay)
        if os.geteuid() != 0:
            pytest.skip(message)  # Postfix's master runs only as root: no install can change that
        pytest.fail(message, pytrace=False)  # a missing Postfix fails loudly: CI must run these

    try:
        yield start
    finally:
        for sink, postfix, relay in reversed(started):
            relay.close()
            postfix.stop()
            sink.stop()


def mail(body: str, subject: str = "help", extra_headers: bytes = b"", to: str = "support@example.com",
         content_type: str = "text/plain") -> bytes:
    """As a sender's MUA writes it: the body as given (long lines too, for DKIM), a Date, an example.org sender."""
    return build_mail(body, subject, sender="Customer <customer@example.org>", to=to, date="now",
                      message_id=email.utils.make_msgid(domain="example.org"), content_type=content_type,
                      encode=False, prepend=extra_headers)


def header_lines(content: bytes) -> list[bytes]:
    """The header section's logical fields (continuation lines joined), as bytes."""
    head = content.split(b"\r\n\r\n", 1)[0]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def fields_named(content: bytes, name: bytes) -> list[bytes]:
    """Values of the header fields called ``name``, also when a NUL hides in the field name: a C
    reader (Sieve, procmail) stops at the NUL, another drops it; either way it reads ``name``."""
    found = []
    for field in header_lines(content):
        raw_name, sep, value = field.partition(b":")
        if not sep:
            continue
        for reading in (raw_name.split(b"\0")[0], raw_name.replace(b"\0", b"")):
            if reading.strip().lower() == name:
                found.append(value.strip())
                break
    return found


def message_id_of(content: bytes) -> bytes:
    [value] = fields_named(content, b"message-id")
    return value


def copies_per_recipient(delivered: Sequence[Delivered]) -> Counter[str]:
    return Counter(rcpt for d in delivered for rcpt in d.rcpt_tos)


# -- tagged once, forged headers stripped ------------------------------------------------------


def test_every_message_tagged_once_delivered_once_and_forged_headers_stripped(pipeline: StartPipeline) -> None:
    p = pipeline()
    forged = b"X-Mailtriage-Category: refunds\r\nX-MAILTRIAGE-Confidence: 1.0000\r\n\tfolded\r\n"
    sent = [mail("Where is my invoice for March?", extra_headers=forged)]
    sent += [mail(f"invoice number {n}") for n in range(4)] + [mail("hello there")]
    for raw in sent:
        p.send(raw)

    delivered = p.settled(len(sent))
    assert len(delivered) == len(sent)
    assert sorted(message_id_of(d.content) for d in delivered) == sorted(message_id_of(raw) for raw in sent)
    for d in delivered:
        assert d.rcpt_tos == ("support@example.com",)
        assert len(fields_named(d.content, CATEGORY)) == 1
        assert len(fields_named(d.content, b"x-mailtriage-confidence")) == 1
        assert b"refunds" not in d.content and b"folded" not in d.content
    categories = Counter(fields_named(d.content, CATEGORY)[0] for d in delivered)
    assert categories == {b"billing": 5, b"unsure": 1}
    # Through mailtriage exactly once each: the recipe's transport handed over each message once.
    assert len(p.postfix.log_lines(rf"postfix/mailtriage/smtp.*:{p.relay.port}, .*status=sent")) == len(sent)


def test_a_nul_in_a_header_name_never_reaches_delivery_as_a_category(pipeline: StartPipeline) -> None:
    p = pipeline()
    raw = mail("Where is my invoice?").replace(b"Subject:", b"X-Mailtriage-Category\0: x\r\nSubject:", 1)
    p.send(raw)
    [d] = p.settled(1)
    # Exactly one category field, ours. (Postfix's cleanup already ends the header at a line that is
    # no header field, so the NUL line arrives in the body; mailtriage must not undo that.)
    [category] = fields_named(d.content, CATEGORY)
    assert category in (b"billing", b"unsure")


# -- DKIM: long lines pass unchanged ------------------------------------------------------------


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(private key PEM, DNS TXT record) of a throwaway 1024-bit RSA key made with openssl."""
    folder = tmp_path_factory.mktemp("dkim")
    key = folder / "key.pem"
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(key), "1024"], check=True, capture_output=True)
    public = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    return key.read_bytes(), b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def dkim_signed(body: str, private_key: bytes) -> bytes:
    import dkim

    raw = mail(body, subject="One-line HTML newsletter", content_type="text/html")
    signature = dkim.sign(raw, DKIM_SELECTOR, DKIM_DOMAIN, private_key, canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return signature + raw


def dkim_verifies(content: bytes, txt_record: bytes) -> bool:
    import dkim

    def dns(name: bytes, timeout: int = 5) -> bytes | None:  # the DNS stub: one selector, one domain
        return txt_record if name == DKIM_SELECTOR + b"._domainkey." + DKIM_DOMAIN + b"." else None

    return bool(dkim.verify(content, dnsfunc=dns))


LONG_LINE = "<html><body>" + "<p>invoice line item</p>" * 207 + "<br></body></html>"  # with CRLF: 5,000 octets


def test_dkim_signed_mail_with_a_5000_octet_line_verifies_after_delivery(
    pipeline: StartPipeline, dkim_key: tuple[bytes, bytes]
) -> None:
    private_key, txt = dkim_key
    assert len(LONG_LINE) + 2 == 5000
    signed = dkim_signed(LONG_LINE + "\n", private_key)
    assert dkim_verifies(signed, txt)  # the stub and the key agree before Postfix sees anything
    p = pipeline()
    p.send(signed)
    [d] = p.settled(1)
    assert fields_named(d.content, CATEGORY) == [b"billing"]
    assert LONG_LINE.encode() + b"\r\n" in d.content
    assert dkim_verifies(d.content, txt)


def test_without_the_line_length_override_postfix_folds_the_line_and_dkim_fails(
    pipeline: StartPipeline, dkim_key: tuple[bytes, bytes]
) -> None:
    # What the recipe's `-o smtp_line_length_limit=0` is for: the same mail, without it.
    def drop_override(name: str, text: str) -> str:
        edited = text.replace("  -o smtp_line_length_limit=0\n", "")
        assert name != "master.cf" or edited != text, "the recipe no longer sets smtp_line_length_limit=0"
        return edited

    private_key, txt = dkim_key
    p = pipeline(recipe_edit=drop_override)
    p.send(dkim_signed(LONG_LINE + "\n", private_key))
    [d] = p.settled(1)
    assert LONG_LINE.encode() not in d.content
    assert not dkim_verifies(d.content, txt)


# -- aliases expand once ----------------------------------------------------------------------

ALIASES: Mapping[str, Sequence[str]] = {"team@example.com": ["team@example.com", "other@example.com"]}


def test_an_alias_that_keeps_its_own_address_expands_once(pipeline: StartPipeline) -> None:
    p = pipeline(virtual_aliases=ALIASES)
    for n in range(3):
        p.send(mail(f"invoice {n}", to="team@example.com"), to=["team@example.com"])
    delivered = p.settled(1)
    assert copies_per_recipient(delivered) == {"team@example.com": 3, "other@example.com": 3}
    assert all(len(fields_named(d.content, CATEGORY)) == 1 for d in delivered)


def test_without_no_address_mappings_the_alias_expands_twice(pipeline: StartPipeline) -> None:
    # What the recipe's `receive_override_options = no_address_mappings` is for: the same mail, without it.
    def drop_setting(name: str, text: str) -> str:
        edited = re.sub(r"(?m)^receive_override_options = no_address_mappings\n", "", text)
        assert name != "main.cf" or edited != text, "the recipe no longer sets no_address_mappings"
        return edited

    p = pipeline(virtual_aliases=ALIASES, recipe_edit=drop_setting)
    p.send(mail("invoice", to="team@example.com"), to=["team@example.com"])
    delivered = p.settled(1)
    assert copies_per_recipient(delivered)["other@example.com"] == 2


def test_filtering_only_the_support_address_expands_every_alias_once(pipeline: StartPipeline) -> None:
    # README's variant: FILTER on one recipient instead of content_filter, no_address_mappings moved
    # to the reinjection listener; mail that is not filtered must still have its aliases expanded.
    def selective(name: str, text: str) -> str:
        if name == "main.cf":
            edited = text.replace(
                "content_filter = mailtriage:[127.0.0.1]:10025",
                "smtpd_recipient_restrictions = check_recipient_access inline:{ { support@example.com = "
                "FILTER mailtriage:[127.0.0.1]:10025 } }, permit_mynetworks, reject_unauth_destination",
            )
            edited = re.sub(r"(?m)^receive_override_options = no_address_mappings\n", "", edited)
        else:
            edited = text.replace("no_header_body_checks,no_milters\n", "no_header_body_checks,no_milters,no_address_mappings\n")
        assert edited != text, f"the recipe's {name} changed: update this variant and README.md's prose"
        return edited

    aliases = {**ALIASES, "support@example.com": ["support@example.com", "helpdesk@example.com"]}
    p = pipeline(virtual_aliases=aliases, recipe_edit=selective)
    p.send(mail("invoice for the team", to="team@example.com"), to=["team@example.com"])
    p.send(mail("invoice for support"), to=["support@example.com"])
    delivered = p.settled(2)
    assert copies_per_recipient(delivered) == {
        "team@example.com": 1, "other@example.com": 1, "support@example.com": 1, "helpdesk@example.com": 1,
    }
    for d in delivered:
        tagged = fields_named(d.content, CATEGORY)
        assert tagged == ([b"billing"] if "support@example.com" in d.rcpt_tos else []), d.rcpt_tos


# -- mailtriage down: Postfix keeps the mail --------------------------------------------------


def test_mailtriage_down_postfix_defers_and_delivers_once_after_restart(pipeline: StartPipeline) -> None:
    p = pipeline()
    p.send(mail("invoice before the outage"))
    p.settled(1)
    p.relay.stop()

    sent = [mail(f"invoice during the outage {n}") for n in range(5)]
    for raw in sent:
        p.send(raw)
    queue = p.postfix.wait_queue(
        lambda q: len(q) == len(sent) and all(m["queue_name"] == "deferred" for m in q),
        what=f"{len(sent)} deferred messages",
    )
    reasons = {r.get("delay_reason", "") for m in queue for r in m["recipients"]}
    assert all("Connection refused" in reason for reason in reasons), reasons
    assert len(p.sink.received) == 1

    p.relay.start()
    p.postfix.flush()
    delivered = p.settled(1 + len(sent))
    assert len(delivered) == 1 + len(sent)
    ids = Counter(message_id_of(d.content) for d in delivered)
    assert all(ids[message_id_of(raw)] == 1 for raw in sent)
    assert all(d.mail_from != "" for d in delivered)  # no bounce went back to the sender
    assert p.postfix.log_lines(r"status=bounced") == []


# -- the docs show the files the tests apply --------------------------------------------------


def test_readme_and_install_show_the_recipe_files_verbatim() -> None:
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    for name in ("main.cf", "master.cf"):
        text = (RECIPE_DIR / name).read_text()
        assert f"```\n{text}```" in readme, f"README.md does not show docs/postfix/{name} verbatim"


# -- no write waits on a delayed ACK ----------------------------------------------------------------

DELAYED_ACK_MESSAGES = 20


def delayed_acks_child() -> None:
    """In a network namespace of its own (so the count is ours alone): Postfix + the content filter +
    sink, DELAYED_ACK_MESSAGES mails through; prints how many delayed ACKs that took."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    sink = SmtpSink().start()
    postfix = Postfix(sink.port)
    relay = Relay(postfix.filter_port, postfix.reinject_port)
    try:
        postfix.start()
        relay.start()
        pipe = Pipeline(postfix, sink, relay)
        # One session, as an MTA sends: new connections of our own test client are not the count.
        with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, local_hostname="client.test", timeout=30) as client:
            client.sendmail("customer@example.org", ["support@example.com"], mail("warm-up invoice"))
            pipe.settled(1)
            before = delayed_acks()
            for n in range(DELAYED_ACK_MESSAGES):
                client.sendmail("customer@example.org", ["support@example.com"], mail(f"invoice {n}"))
            pipe.settled(1 + DELAYED_ACK_MESSAGES)
            after = delayed_acks()
    finally:
        relay.close()
        postfix.stop()
        sink.stop()
    print(f"DELAYED_ACKS {after - before}", flush=True)


def test_relayed_mail_never_waits_on_a_delayed_ack() -> None:
    # The next-hop client writes the message and then the final dot as separate small writes; with
    # Nagle's algorithm on, the dot waited for the ACK of the data, which the peer delays ~40 ms:
    # two or three timer ACKs per message, ~45 ms added to every relayed mail (counted, not timed).
    count = delayed_acks_in_namespace("tests.test_postfix:delayed_acks_child", Path(__file__).resolve().parents[1])
    if count is None:
        pytest.skip("needs root, unshare and ip: the count is taken in a network namespace of its own")
    # Before: 44-47 for 20 messages; now mostly 0 (a few of Postfix's own on a busy host).
    assert count < DELAYED_ACK_MESSAGES, count

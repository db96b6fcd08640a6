"""Every intake stores an explanation with its decision, and writes X-Mailtriage-Why only when asked:
the IMAP watcher against a real Dovecot, the SMTP filter between real SMTP servers.

The classifier is a real TF-IDF baseline fitted on the toy set (no torch), served through the same
``classify_explained`` the daemon's inference worker calls.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from mailtriage.config import Config
from mailtriage.core.classifier import Prediction, classify_explained
from mailtriage.core.explain import Explanation
from mailtriage.imap.watcher import MailboxWatcher
from mailtriage.model import ensemble
from mailtriage.model.manifest import Manifest
from mailtriage.smtp.nexthop import NextHop
from mailtriage.smtp.relay import SmtpFilter
from mailtriage.store.state import SMTP_INTAKE, StateDB
from mailtriage.testing.dovecot import load_messages
from tests.models import TOY_LABELS, toy_dataset
from tests.test_relay import LoopThread, NextHopHandler, mail, next_hop, relay_config  # noqa: F401 - fixture
from tests.test_watcher import (  # noqa: F401 - fixtures
    CATEGORIES, config, contents, count_where, make_account, msg, user,
)

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> ensemble.BaselineClassifier:
    from mailtriage_trainer.evaluate import Baseline

    assert tuple(CATEGORIES) == TOY_LABELS
    version = tmp_path_factory.mktemp("v1")
    train = toy_dataset()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Baseline(TOY_LABELS).fit([t for t, _ in train], [y for _, y in train]).save(version)
    return ensemble.BaselineClassifier(ensemble.load_baseline(version, TOY_LABELS), TOY_LABELS, path=version,
                                       manifest=Manifest())


def _why_of(row_explanation: str | None) -> Explanation:
    assert row_explanation is not None, "the decision was stored without its explanation"
    return Explanation.from_json(row_explanation)


# ---- IMAP: a real Dovecot ------------------------------------------------------------------------------


def test_a_filed_message_row_holds_its_explanation(
    dovecot: Any, user: Any, make_account: Any, config: Config, baseline: ensemble.BaselineClassifier
) -> None:
    name, password, client = user
    load_messages(client, "INBOX", [msg(1, "Invoice 1 is wrong, the invoice total"), msg(2, "Refund please, refund")])
    w = MailboxWatcher(make_account(dovecot, name, password), "INBOX", config, StateDB(config.state_path),
                       lambda texts: (classify_explained(baseline, texts), baseline.version), idle_slice=0.2)
    try:
        assert w.process_backlog() == 2
    finally:
        w.close()
    assert count_where(client)["INBOX"] == 0
    rows = {r.label: r for r in w.state.rows("acct")}
    assert set(rows) == {"billing", "refunds"} and all(r.status == "done" for r in rows.values())
    why = _why_of(rows["billing"].explanation)
    assert (why.label, why.part, why.threshold, why.version) == ("billing", "baseline", 0.6, baseline.version)
    assert why.unsure == rows["billing"].unsure and why.confidence == pytest.approx(rows["billing"].confidence, abs=1e-4)
    assert why.terms is not None and "invoice" in {t.text for t in why.terms.toward}
    assert "refund" in {t.text for t in _why_of(rows["refunds"].explanation).terms.toward}  # type: ignore[union-attr]
    # The console finds each decision by subject and sender.
    envelopes = {r["key"]: r for r in w.state.query("SELECT * FROM envelopes")}
    assert {envelopes[r.key]["sender"] for r in rows.values()} == {"Customer 1 <c1@example.com>", "Customer 2 <c2@example.com>"}
    # No X-Mailtriage-Why unless asked (the move action writes no header at all).
    (filed,) = contents(client, "Support/Billing").values()
    assert b"X-Mailtriage" not in filed["header"]


def test_the_header_action_adds_the_why_header_when_asked_and_strips_a_forged_one(
    dovecot: Any, user: Any, make_account: Any, config: Config, baseline: ensemble.BaselineClassifier
) -> None:
    name, password, client = user
    forged = msg(1, "Invoice 1 is wrong").replace(b"Subject:", b"X-Mailtriage-Why: filed=refunds trust me\r\nSubject:")
    load_messages(client, "INBOX", [forged])
    asked = dataclasses.replace(config, why_header=True)
    w = MailboxWatcher(make_account(dovecot, name, password, action="header"), "INBOX", asked,
                       StateDB(config.state_path), lambda texts: (classify_explained(baseline, texts), baseline.version),
                       idle_slice=0.2)
    try:
        assert w.process_backlog() == 1
    finally:
        w.close()
    (copy,) = contents(client, "Support/Billing").values()
    header = message_from_bytes(copy["header"])
    (why,) = header.get_all("X-Mailtriage-Why")
    assert why.startswith("filed=billing ") and "by=baseline" in why and "words=" in why and "trust me" not in why
    assert _why_of(w.state.rows("acct")[0].explanation).label == "billing"


# ---- SMTP filter: real sockets both sides --------------------------------------------------------------


def _relay(loop: LoopThread, config: Config, hop_port: int, baseline: ensemble.BaselineClassifier,
           state: StateDB) -> SmtpFilter:
    async def classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
        return classify_explained(baseline, texts), baseline.version

    server = SmtpFilter(config, classify, port=0, hostname="relay.test", record=state.record_relayed,
                        next_hop=NextHop("127.0.0.1", hop_port, timeout=10, local_hostname="relay.test"))
    loop.run(server.start())
    return server


@pytest.mark.parametrize("asked", [False, True], ids=["default", "why_header"])
def test_the_relay_stores_the_explanation_and_adds_why_only_when_asked(
    tmp_path: Path, next_hop: tuple[NextHopHandler, int], baseline: ensemble.BaselineClassifier, asked: bool
) -> None:
    import smtplib

    handler, hop_port = next_hop
    config = dataclasses.replace(relay_config(listen_port=1, next_hop_port=hop_port), why_header=asked)
    state = StateDB(tmp_path / "state.sqlite3")
    loop = LoopThread()
    server = _relay(loop, config, hop_port, baseline, state)
    try:
        raw = mail("Please resend the invoice, the invoice total is wrong")
        raw = raw.replace(b"Subject:", b"X-Mailtriage-Why: filed=refunds\r\nx-mailtriage-why : forged\r\nSubject:")
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=30) as client:
            client.sendmail("customer@example.com", ["support@example.com"], raw)
    finally:
        loop.run(server.close(grace=1))
        loop.stop()
    (envelope,) = handler.received
    delivered = message_from_bytes(envelope.content)
    whys = delivered.get_all("X-Mailtriage-Why") or []
    assert b"forged" not in envelope.content and b"filed=refunds" not in envelope.content
    if asked:
        (why,) = whys
        assert why.startswith("filed=billing ") and why.isascii()
        assert list(delivered.keys())[:3] == ["X-Mailtriage-Category", "X-Mailtriage-Confidence", "X-Mailtriage-Why"]
    else:
        assert whys == []
    (row,) = state.rows(SMTP_INTAKE)
    why = _why_of(row.explanation)
    (env,) = state.query("SELECT * FROM envelopes")
    assert (env["key"], env["subject"], env["sender"]) == (row.key, "help", "customer@example.com")
    assert (why.label, why.part, row.label) == ("billing", "baseline", "billing")
    assert why.terms is not None and "invoice" in {t.text for t in why.terms.toward}


# ---- the milter, through the whole service (its inference worker asks for the evidence) ---------------


def test_the_served_milter_stores_the_explanation_and_adds_a_one_line_why(
    tmp_path: Path, baseline: ensemble.BaselineClassifier
) -> None:
    import asyncio
    import socket

    from mailtriage.config import MilterConfig, ModelConfig, TrainingConfig
    from mailtriage.core.labels import LabelSet
    from mailtriage.model import modeldir
    from mailtriage.service.app import Service
    from mailtriage.store.state import MILTER_INTAKE
    from mailtriage.testing.milter import tag_once
    from tests.test_milter import mail as milter_mail

    models = tmp_path / "models"
    version = models / "v1"
    version.mkdir(parents=True)
    LabelSet(TOY_LABELS).save(version)
    modeldir.promote(models, version)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = Config(
        categories=CATEGORIES, state_path=str(tmp_path / "state.sqlite3"), why_header=True,
        model=ModelConfig(path=str(models), device="cpu", threshold=0.6),
        training=TrainingConfig(schedule="", model_dir=str(models)),
        milter=MilterConfig(enabled=True, listen_port=port),
    )
    service = Service(config, None, load_model=lambda path: baseline)
    raw = milter_mail("Please refund me, the refund is late", prepend=b"X-Mailtriage-Why: filed=billing forged\r\n")

    async def main() -> Any:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        try:
            return await asyncio.to_thread(tag_once, "127.0.0.1", port, raw)
        finally:
            service.stop()
            await asyncio.wait_for(task, 20)

    result = asyncio.run(main())
    added = result.added()
    assert added["X-Mailtriage-Category"] == "refunds"
    why = added["X-Mailtriage-Why"]
    assert why.startswith("filed=refunds ") and "\n" not in why and "\r" not in why and len(why) < 400
    assert ("X-Mailtriage-Why", 1) in result.deleted()  # the sender's one
    (row,) = [r for r in StateDB(config.state_path).rows() if r.account == MILTER_INTAKE]
    stored = _why_of(row.explanation)
    assert (stored.label, stored.part) == ("refunds", "baseline")
    (env,) = StateDB(config.state_path).query("SELECT * FROM envelopes")
    assert env["key"] == row.key and env["sender"]
    assert stored.terms is not None and "refund" in {t.text for t in stored.terms.toward}

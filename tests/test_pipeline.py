"""The one classify -> label check -> route step (core/pipeline.py), as pure logic."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from mailtriage.core import pipeline
from mailtriage.core.backoff import delay
from mailtriage.core.classifier import Prediction
from mailtriage.core.pipeline import (
    UNKNOWN_KEY,
    DecidedBy,
    Rules,
    classify_and_route,
    classify_and_route_async,
    prepare,
    route,
)
from mailtriage.errors import LabelMismatchError, ModelError

pytestmark = pytest.mark.pure

RULES = Rules({"billing": "Support/Billing", "login": "Support/Login"}, 0.6, "Support/Unsure")


def p(label: str, confidence: float) -> Prediction:
    return Prediction(label, confidence, {label: confidence})


@pytest.mark.parametrize(
    ("prediction", "folder", "unsure", "decided_by"),
    [
        (p("billing", 0.9), "Support/Billing", False, DecidedBy.MODEL),
        (p("login", 0.6), "Support/Login", False, DecidedBy.MODEL),  # at the threshold: filed
        (p("login", 0.5999), "Support/Unsure", True, DecidedBy.THRESHOLD),
    ],
)
def test_route_table(prediction: Prediction, folder: str, unsure: bool, decided_by: DecidedBy) -> None:
    (routed,) = route([prediction], "v1", 1, RULES)
    assert (routed.decision.folder, routed.decision.unsure, routed.decided_by, routed.model_version) == (
        folder, unsure, decided_by, "v1")
    assert routed.decision.label == prediction.label  # recorded even when unsure


def test_a_label_outside_the_categories_is_a_label_mismatch() -> None:
    with pytest.raises(LabelMismatchError, match="'spam', which is not a configured category"):
        route([p("spam", 0.99)], "v1", 1, RULES)


def test_a_wrong_number_of_predictions_is_refused() -> None:
    with pytest.raises(ModelError, match="2 predictions for 1 texts"):
        route([p("billing", 0.9), p("login", 0.9)], "v1", 1, RULES)


def test_classify_and_route_uses_the_classify_seam() -> None:
    routed = classify_and_route(["a", "b"], lambda texts: ([p("billing", 0.9) for _ in texts], "v7"), RULES)
    assert [r.model_version for r in routed] == ["v7", "v7"]


def test_classify_and_route_async_checks_labels_as_the_sync_one_does() -> None:
    async def classify(texts: Sequence[str]) -> tuple[list[Prediction], str]:
        return [p("billing", 0.9), p("spam", 0.1)][: len(texts)], "v8"

    (routed,) = asyncio.run(classify_and_route_async(["a"], classify, RULES))
    assert (routed.decision.folder, routed.model_version) == ("Support/Billing", "v8")
    with pytest.raises(LabelMismatchError):
        asyncio.run(classify_and_route_async(["a", "b"], classify, RULES))  # an unsure "spam" too


def test_prepare_gives_the_mail_text_and_the_message_key(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = b"Message-ID: <a1@example.com>\r\nSubject: Invoice\r\n\r\nWhere is it?\r\n"
    assert prepare(raw) == ("Invoice\n\nWhere is it?", "a1@example.com")

    def broken(raw: bytes) -> str:
        raise ValueError("a bug")

    # The key only names the message: a failure to compute it never stops the message.
    monkeypatch.setattr(pipeline, "message_key", broken)
    assert prepare(raw) == ("Invoice\n\nWhere is it?", UNKNOWN_KEY)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [delay(n, 1.0, 10.0) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert delay(10_000, 60.0, 3600.0) == 3600.0  # no float overflow on a long outage

"""The one classify -> label check -> route step every intake runs (IMAP filing, SMTP filter, later
ones), so a rule about what a prediction may do is written once.

Pure: the model is reached only through the callable an intake passes in (``ClassifyFn``, or
``ClassifyAsync`` on the event loop, which is only awaited here), and the result is a value: where
the message goes, which model said so, and why (an ``Explanation``, stored with the decision).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from mailtriage.core.classifier import Prediction
from mailtriage.core.explain import Explanation, explain
from mailtriage.core.mailtext import mail_text, message_key
from mailtriage.core.routing import Decision, decide
from mailtriage.errors import LabelMismatchError, ModelError

if TYPE_CHECKING:
    from mailtriage.config import Config

# The daemon's seam to the model: texts in, one prediction per text and the version of the model
# that made them out (the version is recorded with every decision, so a hot reload mid-stream is
# visible). The service's inference worker is one; a test passes a plain function.
ClassifyFn = Callable[[Sequence[str]], tuple[list[Prediction], str]]
# The same seam for an intake on the event loop (SMTP filter, milter): the service's
# ``classify_async`` hands the batch to the inference worker and awaits it.
ClassifyAsync = Callable[[Sequence[str]], Awaitable[tuple[list[Prediction], str]]]

# The key of a message whose key could not be computed: such a decision is not recorded (it could
# never be found again to correct it).
UNKNOWN_KEY = "unknown"


class DecidedBy(StrEnum):
    """What put the message where it goes."""

    MODEL = "model"          # the model was confident enough: its category's folder
    THRESHOLD = "threshold"  # below the confidence threshold: the unsure folder, never a guess


@dataclass(frozen=True)
class Rules:
    """What routing needs of the configuration."""

    categories: Mapping[str, str]  # label -> folder, in the configured order
    threshold: float
    unsure_folder: str

    @classmethod
    def of(cls, config: Config) -> Rules:
        return cls(config.categories, config.model.threshold, config.unsure_folder)


@dataclass(frozen=True)
class Routed:
    """One message's result: the decision, the model version that made it, and what decided."""

    decision: Decision
    model_version: str
    decided_by: DecidedBy
    # Why (top labels, part, threshold, TF-IDF words): stored with the decision, shown by the console
    # and, opted in, summarised in X-Mailtriage-Why. ``route`` always sets it.
    explanation: Explanation | None = None


def route(predictions: Sequence[Prediction], model_version: str, expected: int, rules: Rules) -> list[Routed]:
    """Check what a classifier returned for ``expected`` texts and route each prediction.

    Raises ModelError when the count is wrong, LabelMismatchError when a label is not a configured
    category (the adapter does not match ``[categories]``: no message can be filed by it).
    """
    if len(predictions) != expected:
        raise ModelError(f"classify returned {len(predictions)} predictions for {expected} texts")
    out = []
    for pred in predictions:
        if pred.label not in rules.categories:
            raise LabelMismatchError(
                f"the model predicted {pred.label!r}, which is not a configured category "
                f"{list(rules.categories)}; the adapter does not match [categories]"
            )
        decision = decide(pred, rules.threshold, rules.categories, rules.unsure_folder)
        why = explain(pred.evidence, pred.label, pred.confidence, pred.scores, rules.threshold, decision.unsure,
                      model_version)
        out.append(Routed(decision, model_version, DecidedBy.THRESHOLD if decision.unsure else DecidedBy.MODEL, why))
    return out


def classify_and_route(texts: Sequence[str], classify: ClassifyFn, rules: Rules) -> list[Routed]:
    """Classify ``texts`` (mailtext output) in one batch and route each; raises what classify raises."""
    predictions, model_version = classify(texts)
    return route(predictions, model_version, len(texts), rules)


async def classify_and_route_async(texts: Sequence[str], classify: ClassifyAsync, rules: Rules) -> list[Routed]:
    """``classify_and_route`` for an intake on the event loop: awaits ``classify``, nothing else."""
    predictions, model_version = await classify(texts)
    return route(predictions, model_version, len(texts), rules)


def prepare(raw: bytes) -> tuple[str, str]:
    """(mail text, message key) of one message as an intake received it (blocking on large mail:
    run it in a worker thread). Never raises: the key only names the message in the state database
    and the logs, so a failure to compute it must not stop the message; it is then UNKNOWN_KEY."""
    try:
        key = message_key(raw)
    except Exception:  # noqa: BLE001
        key = UNKNOWN_KEY
    return mail_text(raw), key

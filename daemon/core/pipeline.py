"""The one classify -> label check -> route step every intake runs (IMAP filing, SMTP filter, later
ones), so a rule about what a prediction may do is written once.

Pure: the model is reached only through ``ClassifyFn`` (or, for an async intake, the predictions it
already got), and the result is a value: where the message goes, which model said so, and why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from mailtriage.core.classifier import Prediction
from mailtriage.core.routing import Decision, decide
from mailtriage.errors import LabelMismatchError, ModelError

if TYPE_CHECKING:
    from mailtriage.config import Config

# The daemon's seam to the model: texts in, one prediction per text and the version of the model
# that made them out (the version is recorded with every decision, so a hot reload mid-stream is
# visible). The service's inference worker is one; a test passes a plain function.
ClassifyFn = Callable[[Sequence[str]], tuple[list[Prediction], str]]


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
        out.append(Routed(decision, model_version, DecidedBy.THRESHOLD if decision.unsure else DecidedBy.MODEL))
    return out


def classify_and_route(texts: Sequence[str], classify: ClassifyFn, rules: Rules) -> list[Routed]:
    """Classify ``texts`` (mailtext output) in one batch and route each; raises what classify raises."""
    predictions, model_version = classify(texts)
    return route(predictions, model_version, len(texts), rules)

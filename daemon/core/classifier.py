"""The seam between mail and model: what a classifier takes and returns.

Only ``mailtriage.model.transformers`` implements it with torch; everything else (routing, the daemon, tests
of pure logic) depends on this protocol, so importing them never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mailtriage.core.explain import Evidence


@dataclass(frozen=True)
class Prediction:
    label: str                      # always one of the classifier's labels
    confidence: float               # softmax probability of `label`, 0..1
    scores: Mapping[str, float]     # probability of every label
    # How the classifier scored it (which part served, the TF-IDF words): set by ``classify_explained``
    # only; ``classify`` leaves it None so callers that never show it never pay for it.
    evidence: Evidence | None = None


class Classifier(Protocol):
    labels: tuple[str, ...]
    version: str                    # model version (directory name), for logs and the state db

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """One Prediction per text, in order. Texts are mailtext output, never raw bytes."""
        ...


@runtime_checkable
class Explainer(Protocol):
    """A classifier that can say how it scored each text (``mailtriage.core.explain``)."""

    def classify_explained(self, texts: Sequence[str]) -> list[Prediction]:
        """What ``classify`` returns, each Prediction with its ``evidence``; the same labels and scores."""
        ...


def classify_explained(classifier: Classifier, texts: Sequence[str]) -> list[Prediction]:
    """``classify_explained`` where the classifier has it, else ``classify`` (the predictions then carry
    no evidence, and their explanations say so)."""
    if isinstance(classifier, Explainer):
        return classifier.classify_explained(texts)
    return classifier.classify(texts)

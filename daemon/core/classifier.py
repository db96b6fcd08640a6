"""The seam between mail and model: what a classifier takes and returns.

Only ``mailtriage.model.transformers`` implements it with torch; everything else (routing, the daemon, tests
of pure logic) depends on this protocol, so importing them never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Prediction:
    label: str                      # always one of the classifier's labels
    confidence: float               # softmax probability of `label`, 0..1
    scores: Mapping[str, float]     # probability of every label


class Classifier(Protocol):
    labels: tuple[str, ...]
    version: str                    # model version (directory name), for logs and the state db

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """One Prediction per text, in order. Texts are mailtext output, never raw bytes."""
        ...

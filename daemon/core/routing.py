"""Pure routing: a Prediction and the config's threshold -> where the message should go."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from mailtriage.core.classifier import Prediction


@dataclass(frozen=True)
class Decision:
    label: str            # the predicted label (recorded even when unsure)
    confidence: float
    unsure: bool          # below threshold: never filed as a guess
    folder: str           # destination folder: the category's, or the unsure folder


def is_unsure(confidence: float, threshold: float) -> bool:
    """Below the threshold, or not a finite number: NaN compares False with everything, so a plain
    ``confidence < threshold`` would file a NaN (from broken arithmetic or a broken model) as sure."""
    return not (math.isfinite(confidence) and confidence >= threshold)


def decide(prediction: Prediction, threshold: float, categories: Mapping[str, str], unsure_folder: str) -> Decision:
    unsure = is_unsure(prediction.confidence, threshold)
    folder = unsure_folder if unsure else categories[prediction.label]
    return Decision(prediction.label, prediction.confidence, unsure, folder)

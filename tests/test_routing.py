"""routing.decide, table-style: the threshold boundary and confidences that are not numbers."""

from __future__ import annotations

import math

import pytest

from mailtriage.core.classifier import Prediction
from mailtriage.core.routing import Decision, decide, is_unsure

pytestmark = pytest.mark.pure

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login"}
UNSURE = "Support/Unsure"


@pytest.mark.parametrize(("confidence", "threshold", "unsure"), [
    (0.9, 0.6, False),
    (0.6, 0.6, False),                 # exactly at the threshold: sure (">=", as documented)
    (math.nextafter(0.6, 0.0), 0.6, True),  # the largest float below it: unsure
    (0.0, 0.6, True),
    (1.0, 1.0, False),
    (0.0, 0.0, False),                 # threshold 0 files everything that is a number
    (math.nan, 0.6, True),             # NaN < threshold is False: a plain comparison would file it
    (math.nan, 0.0, True),
    (math.inf, 0.6, True),             # not a probability: broken arithmetic, never filed as a guess
    (-math.inf, 0.6, True),
    (-math.inf, 0.0, True),
])
def test_decide_table(confidence: float, threshold: float, unsure: bool) -> None:
    decision = decide(Prediction("billing", confidence, {"billing": confidence}), threshold, CATEGORIES, UNSURE)
    assert decision.unsure is unsure
    assert decision.folder == (UNSURE if unsure else "Support/Billing")
    assert decision.label == "billing"  # the guess is recorded even when unsure
    assert decision.confidence is confidence or (math.isnan(confidence) and math.isnan(decision.confidence))
    assert is_unsure(confidence, threshold) is unsure


def test_decide_files_each_label_into_its_own_folder() -> None:
    assert decide(Prediction("login", 0.8, {}), 0.5, CATEGORIES, UNSURE) == Decision("login", 0.8, False, "Support/Login")


def test_an_unsure_prediction_never_needs_its_label_to_be_a_category() -> None:
    # A NaN confidence from a label the config lacks still goes to the unsure folder, no KeyError.
    assert decide(Prediction("other", math.nan, {}), 0.5, CATEGORIES, UNSURE).folder == UNSURE

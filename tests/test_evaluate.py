"""Evaluation numbers: metrics, threshold coverage, the TF-IDF baseline and classifier batching."""

from __future__ import annotations

import numpy as np
import pytest

from mailtriage.errors import ModelError, TrainingDataError
from mailtriage.testing.fakes import KeywordClassifier
from mailtriage_trainer.evaluate import (
    Baseline,
    at_threshold,
    choose_serve,
    choose_weight,
    expected_calibration_error,
    fit_temperature,
    ood_auroc,
    softmax,
    threshold_for_accuracy,
    ensemble_probs,
    evaluate_classifier,
    metrics,
    score_probs,
)
from mailtriage_trainer.sources import Example

pytestmark = pytest.mark.pure


def test_metrics_known_values() -> None:
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "b", "a"]
    m = metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == 1.0
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert m["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_macro_f1_skips_labels_absent_from_truth_and_predictions() -> None:
    m = metrics(["a", "b"], ["a", "b"], ["a", "b", "never"])
    assert m["macro_f1"] == 1.0


def test_metrics_refuses_unknown_labels() -> None:
    with pytest.raises(TrainingDataError, match="zzz"):
        metrics(["a"], ["zzz"], ["a", "b"])


def test_at_threshold() -> None:
    t = at_threshold(["a", "b", "a", "b"], ["a", "a", "a", "b"], [0.9, 0.8, 0.4, 0.7], 0.75)
    assert t == {"threshold": 0.75, "n_covered": 2, "coverage": 0.5, "accuracy_on_covered": 0.5}
    assert at_threshold(["a"], ["a"], [0.1], 0.5)["accuracy_on_covered"] == 0.0


def test_score_probs_argmax_and_threshold_table() -> None:
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    r = score_probs(["a", "b", "b"], probs, ["a", "b"], thresholds=[0.0, 0.6])
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert [t["coverage"] for t in r["thresholds"]] == [1.0, pytest.approx(2 / 3)]
    assert r["thresholds"][1]["accuracy_on_covered"] == 1.0


TEXTS = {
    "billing": ["invoice amount wrong", "invoice charged twice", "copy of my invoice", "invoice vat number",
                "invoice total wrong", "send invoice please"],
    "login": ["cannot login password", "password reset broken", "login locked out", "forgot password login",
              "login error password", "password expired login"],
}


def test_baseline_learns_keywords_and_orders_columns_by_labels() -> None:
    texts = [t for label in TEXTS for t in TEXTS[label]]
    y = [label for label in TEXTS for _ in TEXTS[label]]
    labels = ["login", "billing", "refunds"]  # a label without training examples keeps probability 0
    model = Baseline(labels, seed=0).fit(texts, y)
    p = model.predict_proba(["my invoice is wrong", "the password does not work"])
    assert p.shape == (2, 3)
    assert p[0].argmax() == 1 and p[1].argmax() == 0
    assert np.allclose(p[:, 2], 0.0) and np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(ensemble_probs(p, p), p)


def fake_classifier() -> KeywordClassifier:
    """Keywords standing in for the torch model (pure logic under test is the batching)."""
    return KeywordClassifier(("billing", "login"), {"invoice": "billing"}, version="fake", hit=0.8, miss=0.8, default="login")


def test_evaluate_classifier_batches_and_scores() -> None:
    examples = [Example(t, label, t, None, "x") for label in TEXTS for t in TEXTS[label]]
    clf = fake_classifier()
    r = evaluate_classifier(clf, examples, batch_size=5, progress=False)
    assert clf.batches == [5, 5, 2]
    assert r["accuracy"] == 1.0 and r["n"] == 12
    assert {"n", "accuracy", "macro_f1", "per_class"} <= set(r)


def test_evaluate_classifier_refuses_labels_the_model_lacks() -> None:
    with pytest.raises(TrainingDataError, match="refunds"):
        evaluate_classifier(fake_classifier(), [Example("x", "refunds", "k", None, "s")], progress=False)


def test_choose_serve_serves_the_best_on_held_out_mail_never_worse_than_the_baseline() -> None:
    def f1(x: float) -> dict[str, float]:
        return {"macro_f1": x}

    assert choose_serve(f1(0.92), f1(0.95), f1(0.96)) == "ensemble"
    # The demo's case: model 0.922, baseline 0.949, ensemble 0.927 -> the baseline, not the model.
    assert choose_serve(f1(0.922), f1(0.949), f1(0.927)) == "baseline"
    assert choose_serve(f1(0.14), f1(1.0), f1(1.0)) == "ensemble"  # a tie: ensemble before baseline
    assert choose_serve(f1(0.95), f1(0.90), f1(0.95)) == "model"  # a tie keeps the model alone
    for m, b, e in [(0.1, 0.2, 0.3), (0.5, 0.9, 0.1), (0.9, 0.8, 0.85), (0.7, 0.7, 0.6)]:
        served = choose_serve(f1(m), f1(b), f1(e))
        assert {"model": m, "baseline": b, "ensemble": e}[served] >= b


def test_choose_weight_is_picked_on_validation_probabilities() -> None:
    labels = ["a", "b"]
    y = ["a", "b", "a", "b"]
    model = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.2, 0.8]])       # wrong on row 2
    baseline = np.array([[0.6, 0.4], [0.7, 0.3], [0.95, 0.05], [0.4, 0.6]])  # wrong on row 1
    w = choose_weight(y, model, baseline, labels)
    assert score_probs(y, ensemble_probs(model, baseline, w), labels, ())["accuracy"] == 1.0
    # Neither part alone is perfect, so a weight at either end would lose.
    assert 0.0 < w < 1.0
    with pytest.raises(ModelError):
        ensemble_probs(model, baseline, 1.5)


def test_temperature_scaling_recovers_the_temperature_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    logits = rng.normal(0, 3, size=(4000, 4))
    true_p = softmax(logits, 2.5)  # the data behave as if the model were 2.5x overconfident
    y = [labels[rng.choice(4, p=row)] for row in true_p]
    t = fit_temperature(logits, y, labels)
    assert 2.2 < t < 2.8
    before = expected_calibration_error(y, softmax(logits), labels)
    after = expected_calibration_error(y, softmax(logits, t), labels)
    assert after < 0.03 < before
    # The arg-max, hence accuracy, does not move.
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()


def test_threshold_for_accuracy_picks_the_largest_share_that_meets_the_target() -> None:
    labels = ["a", "b"]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = ["a", "a", "a", "a"]  # the third (0.7 for "b") is wrong
    r = threshold_for_accuracy(y, probs, labels, 0.75)
    assert (r["threshold"], r["coverage"], r["accuracy_on_covered"], r["reached"]) == (0.6, 1.0, 0.75, True)
    r = threshold_for_accuracy(y, probs, labels, 0.9)
    assert (r["threshold"], r["coverage"], r["n_covered"]) == (0.8, 0.5, 2)
    # A tie at the cut cannot be split: both 0.8s are in or out together.
    tied = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8]])
    r = threshold_for_accuracy(["a", "a", "a"], tied, labels, 0.9)
    assert (r["threshold"], r["n_covered"]) == (0.9, 1)
    r = threshold_for_accuracy(["b", "b"], np.array([[0.9, 0.1], [0.8, 0.2]]), labels, 0.9)
    assert r["reached"] is False and r["coverage"] == 0.0 and r["threshold"] == 1.0


def test_ood_auroc_counts_pairs_and_ties() -> None:
    assert ood_auroc([0.9, 0.8], [0.1, 0.85]) == 0.75
    assert ood_auroc([0.5], [0.5]) == 0.5
    assert ood_auroc([1.0, 0.9], [0.1, 0.2]) == 1.0


def test_score_probs_reports_ece() -> None:
    probs = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert score_probs(["a", "b"], probs, ["a", "b"], ())["ece"] == pytest.approx(0.5)

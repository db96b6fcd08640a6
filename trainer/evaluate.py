"""Measure a classifier on held-out mail, next to a TF-IDF baseline, in numbers a report can show.

Everything works on probability matrices (examples x labels, in one label order), so the
fine-tuned model, the baseline and their average (the "ensemble") are scored the same way. The
combining rule lives in ``mailtriage.model.ensemble``, which the daemon serves with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from mailtriage.core.classifier import Classifier
from mailtriage.model.ensemble import (
    SERVE_BASELINE, SERVE_ENSEMBLE, SERVE_MODEL, baseline_probs, save_baseline, temper,
)
from mailtriage.model.ensemble import ensemble_probs as ensemble_probs  # re-exported: callers score with it here
from mailtriage.errors import TrainingDataError

log = structlog.get_logger(__name__)

# Confidence thresholds every report shows coverage for (the configured one is added).
DEFAULT_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """n, accuracy, macro_f1, per_class {label: precision, recall, f1, support}, confusion.

    ``confusion[i][j]`` counts examples of ``labels[i]`` predicted as ``labels[j]``. Macro-F1
    averages over labels that occur in ``y_true`` or ``y_pred`` (as scikit-learn does without an
    explicit label list), so a class absent from a small eval set neither helps nor hurts. A
    precision, recall or F1 whose denominator is 0 is 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    labels = list(labels)
    known = set(labels)
    unknown = sorted({y for y in (*y_true, *y_pred) if y not in known})
    if unknown:
        raise TrainingDataError(f"labels {unknown} are not among the model's labels {labels}")
    n = len(y_true)
    if not n:  # scikit-learn refuses empty input; nothing was measured
        return {"n": 0, "accuracy": 0.0, "macro_f1": 0.0, "labels": labels,
                "per_class": {label: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for label in labels},
                "confusion": np.zeros((len(labels), len(labels)), dtype=np.int64).tolist()}
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    confusion = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    # In label order, so the mean adds the same numbers in the same order whatever the labels are called.
    seen = {*y_true, *y_pred}
    present = [label for label in labels if label in seen]
    return {
        "n": n,
        "accuracy": float(np.trace(confusion)) / n,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "labels": labels,
        "confusion": confusion.tolist(),
    }


def at_threshold(
    y_true: Sequence[str], y_pred: Sequence[str], confidence: Sequence[float], threshold: float
) -> dict[str, float | int]:
    """What filing only confident predictions would do: the share filed and how often it is right.

    Below the threshold the daemon sends mail to the unsure folder rather than guessing.
    """
    covered = [t == p for t, p, c in zip(y_true, y_pred, confidence, strict=True) if c >= threshold]
    n = len(y_true)
    return {
        "threshold": threshold,
        "n_covered": len(covered),
        "coverage": len(covered) / n if n else 0.0,
        "accuracy_on_covered": sum(covered) / len(covered) if covered else 0.0,
    }


def score_probs(
    y_true: Sequence[str],
    probs: np.ndarray,
    labels: Sequence[str],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """``metrics`` of the arg-max prediction plus a coverage table over ``thresholds``."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(y_true), len(labels)):
        raise ValueError(f"probabilities have shape {probs.shape}, expected {(len(y_true), len(labels))}")
    best = probs.argmax(axis=1) if len(y_true) else np.zeros(0, dtype=int)
    y_pred = [labels[i] for i in best]
    confidence = probs.max(axis=1).tolist() if len(y_true) else []
    result = metrics(y_true, y_pred, labels)
    result["ece"] = expected_calibration_error(y_true, probs, labels)
    result["thresholds"] = [at_threshold(y_true, y_pred, confidence, t) for t in sorted(set(thresholds))]
    return result


def classifier_probs(
    classifier: Classifier,
    texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 64,
    progress: bool | None = None,
) -> np.ndarray:
    """Probabilities from ``classifier.classify`` in ``labels`` order (labels it lacks get 0)."""
    out = np.zeros((len(texts), len(labels)), dtype=np.float64)
    disable = None if progress is None else not progress
    with tqdm(total=len(texts), desc="evaluating", unit="msg", disable=disable, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            for row, pred in enumerate(classifier.classify(list(batch)), start=start):
                out[row] = [float(pred.scores.get(label, 0.0)) for label in labels]
            bar.update(len(batch))
    return out


def evaluate_classifier(
    classifier: Classifier,
    examples: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    batch_size: int = 64,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Metrics of ``classifier`` on examples (anything with ``.text`` and ``.label``)."""
    labels = list(labels if labels is not None else classifier.labels)
    unknown = sorted({e.label for e in examples} - set(labels))
    if unknown:
        raise TrainingDataError(
            f"the evaluation data has labels {unknown} that model {classifier.version!r} does not know "
            f"(its labels: {labels}); evaluate on data with the model's categories"
        )
    probs = classifier_probs(classifier, [e.text for e in examples], labels, batch_size, progress)
    return score_probs([e.label for e in examples], probs, labels, thresholds)


class Baseline:
    """TF-IDF word 1-2 grams (+ char 2-5 grams on small corpora) and logistic regression.

    The bar a fine-tune must clear: cheap, strong on topical mail, and a sanity check (a fine-tune
    that loses to it is undertrained). Char n-grams help short, typo-ridden text but make the fit
    slow on big corpora (minutes on 9k long messages), so they are used only below ``char_budget``
    total characters. saga with a loose tolerance fits 9k messages x 300k features in ~10 s; full
    convergence would take minutes for a third decimal of macro-F1.
    """

    def __init__(self, labels: Sequence[str], seed: int = 0, c: float = 30.0, char_budget: int = 2_000_000) -> None:
        self.labels = list(labels)
        self.seed = seed
        self.c = c
        self.char_budget = char_budget
        self._pipeline: Any = None

    def fit(self, texts: Sequence[str], y: Sequence[str]) -> Baseline:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion, Pipeline

        if len(set(y)) < 2:
            raise TrainingDataError(f"the baseline needs at least 2 classes in training data, got {sorted(set(y))}")
        parts: list[tuple[str, Any]] = [
            ("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=300_000)),
        ]
        if sum(len(t) for t in texts) <= self.char_budget:
            parts.append(("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True,
                                                  max_features=200_000)))
        self._pipeline = Pipeline([
            ("features", FeatureUnion(parts)),
            ("clf", LogisticRegression(C=self.c, solver="saga", max_iter=50, tol=1e-3, random_state=self.seed)),
        ])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._pipeline.fit(list(texts), list(y))
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if self._pipeline is None:
            raise RuntimeError("Baseline.fit must run before predict_proba")
        # The daemon maps columns to labels with the same function when it serves the ensemble.
        return baseline_probs(self._pipeline, texts, self.labels)

    def save(self, version_dir: Path) -> Path:
        """Save the fitted pipeline (not this class, which the daemon cannot import) for ensemble serving,
        as numbers and words only (``mailtriage.model.ensemble.save_baseline``): no pickle."""
        if self._pipeline is None:
            raise RuntimeError("Baseline.fit must run before save")
        return save_baseline(self._pipeline, version_dir)


# Model shares tried for the ensemble on validation mail (0 and 1 are the parts alone, served as such).
ENSEMBLE_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def choose_weight(
    y_val: Sequence[str], model_p: np.ndarray, baseline_p: np.ndarray, labels: Sequence[str],
    weights: Sequence[float] = ENSEMBLE_WEIGHTS,
) -> float:
    """The model's share in the ensemble with the best validation macro-F1 (ties: closest to 0.5).

    Chosen on the validation slice, never on the holdout, so the ensemble's held-out score is an
    honest estimate like the other two.
    """
    def key(w: float) -> tuple[float, float]:
        return (score_probs(y_val, ensemble_probs(model_p, baseline_p, w), labels, ())["macro_f1"], -abs(w - 0.5))

    return max(weights, key=key)


# Preference on a tie: the fine-tuned model (the product), then the ensemble, then the baseline.
_SERVE_ORDER = (SERVE_MODEL, SERVE_ENSEMBLE, SERVE_BASELINE)


def choose_serve(model: dict[str, Any], baseline: dict[str, Any], ensemble: dict[str, Any]) -> str:
    """What a version serves: whichever of model, baseline and ensemble has the best held-out macro-F1.

    So the served version is never worse than the baseline on held-out mail. A tie (within 1e-9)
    goes to the model, then the ensemble: the baseline alone is served only when it is strictly best.
    """
    scores = {SERVE_MODEL: model["macro_f1"], SERVE_ENSEMBLE: ensemble["macro_f1"], SERVE_BASELINE: baseline["macro_f1"]}
    best = max(scores.values())
    return next(name for name in _SERVE_ORDER if scores[name] >= best - 1e-9)


SERVE_NAMES = {SERVE_MODEL: "the fine-tuned model alone", SERVE_ENSEMBLE: "the ensemble",
               SERVE_BASELINE: "the TF-IDF baseline alone"}


def serve_reason(serve: str, model: dict[str, Any], baseline: dict[str, Any], ensemble: dict[str, Any],
                 weight: float, configured: bool = False) -> str:
    """One sentence for the report: what is served and why (the three held-out macro-F1s)."""
    parts = (f"model {model['macro_f1']:.3f}, TF-IDF baseline {baseline['macro_f1']:.3f}, ensemble "
             f"({weight:.1f} x model + {1 - weight:.1f} x baseline, weight chosen on validation mail) "
             f"{ensemble['macro_f1']:.3f}")
    what = SERVE_NAMES[serve]
    if configured:
        return f"Served: {what}, as configured (training.serve / --serve); held-out macro-F1: {parts}."
    return (f"Served: {what}, because it has the best held-out macro-F1 ({parts}); a tie goes to the model, "
            "then the ensemble.")


def brief(result: dict[str, Any]) -> dict[str, Any]:
    """The contract's JSON shape: n, accuracy, macro_f1, per_class (and the label order)."""
    return {k: result[k] for k in ("n", "accuracy", "macro_f1", "per_class", "labels") if k in result}


# ---- calibration and abstention ---------------------------------------------------------------


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, y: Sequence[str], labels: Sequence[str]) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the negative log-likelihood
    of ``softmax(logits / T)`` on validation mail. One number, so the arg-max (accuracy) is unchanged
    and only the confidences move; a log-spaced grid (0.05..20) then a finer one around the best."""
    logits = np.asarray(logits, dtype=np.float64)
    if not len(y):
        return 1.0
    index = {label: i for i, label in enumerate(labels)}
    rows = np.arange(len(y))
    cols = np.array([index[t] for t in y])

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[rows, cols] - np.log(np.exp(z).sum(axis=1))).mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    best = float(min(grid, key=nll))
    fine = best * np.exp(np.linspace(-0.06, 0.06, 25))
    return round(float(min(fine, key=nll)), 4)


@dataclass(frozen=True)
class ServingFit:
    """What a version's serving takes from the validation slice (never from the holdout)."""

    temperature: float            # the model's logits
    baseline_temperature: float   # the TF-IDF baseline's probabilities
    ensemble_weight: float        # the model's share of the mix
    ensemble_temperature: float   # the mix's own: two calibrated parts averaged are under-confident


def fit_serving(y_val: Sequence[str], val_logits: np.ndarray, val_base_raw: np.ndarray, labels: Sequence[str],
                calibrate: bool = True) -> ServingFit:
    """Temperatures and ensemble weight from validation mail: ``val_logits`` of the fine-tuned model
    and ``val_base_raw`` of a baseline that did not train on that mail; each temperature is 1 when
    ``calibrate`` is off. The trainer and ``benchmarks.recipe`` fit a version the same way here."""
    def fit(logits: np.ndarray) -> float:
        return fit_temperature(logits, y_val, labels) if calibrate else 1.0

    def log_probs(p: np.ndarray) -> np.ndarray:  # log-probabilities are logits up to a constant per row
        return np.log(np.clip(p, 1e-12, 1.0))

    temperature = fit(val_logits)
    model_p = softmax(val_logits, temperature)
    base_temperature = fit(log_probs(val_base_raw))
    base_p = temper(val_base_raw, base_temperature)
    weight = choose_weight(y_val, model_p, base_p, labels)
    return ServingFit(temperature, base_temperature, weight,
                      fit(log_probs(ensemble_probs(model_p, base_p, weight))))


def expected_calibration_error(y: Sequence[str], probs: np.ndarray, labels: Sequence[str], bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over ``bins`` equal-width
    confidence bins (the usual 15), on the arg-max prediction."""
    probs = np.asarray(probs, dtype=np.float64)
    if not len(y):
        return 0.0
    conf = probs.max(axis=1)
    correct = np.array([labels[i] == t for i, t in zip(probs.argmax(axis=1), y, strict=True)], dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(total)


def threshold_for_accuracy(y: Sequence[str], probs: np.ndarray, labels: Sequence[str], target: float) -> dict[str, Any]:
    """The lowest confidence threshold at which the predictions at or above it are at least
    ``target`` accurate on this (held-out) mail, and the coverage it gives.

    Mail below the threshold goes to the unsure folder. When no threshold reaches the target, the
    threshold is 1.0 (file nothing automatically) with ``reached`` false.
    """
    probs = np.asarray(probs, dtype=np.float64)
    n = len(y)
    conf = probs.max(axis=1) if n else np.zeros(0)
    correct = np.array([labels[i] == t for i, t in zip(probs.argmax(axis=1), y, strict=True)], dtype=np.float64) \
        if n else np.zeros(0)
    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(correct[order])
    best_k = 0
    for k in range(1, n + 1):
        # Only cut between distinct confidences: a threshold cannot take half of a tie.
        if k < n and conf[order[k]] == conf[order[k - 1]]:
            continue
        if hits[k - 1] / k >= target - 1e-12:
            best_k = k
    if best_k == 0:
        return {"target_accuracy": target, "threshold": 1.0, "coverage": 0.0, "n_covered": 0,
                "accuracy_on_covered": 0.0, "reached": False, "n": n}
    threshold = float(conf[order[best_k - 1]])
    return {"target_accuracy": target, "threshold": threshold,
            "coverage": best_k / n, "n_covered": best_k, "accuracy_on_covered": float(hits[best_k - 1] / best_k),
            "reached": True, "n": n}


def ood_auroc(in_scope_conf: Sequence[float], oos_conf: Sequence[float]) -> float:
    """AUROC of telling in-scope from out-of-scope mail by confidence alone (higher = in scope):
    the chance that a random in-scope message is more confident than a random OOS one (ties 1/2)."""
    from sklearn.metrics import roc_auc_score

    a = np.asarray(in_scope_conf, dtype=np.float64)
    b = np.asarray(oos_conf, dtype=np.float64)
    if not len(a) or not len(b):
        return float("nan")
    in_scope = np.concatenate([np.ones(len(a)), np.zeros(len(b))])
    return float(roc_auc_score(in_scope, np.concatenate([a, b])))

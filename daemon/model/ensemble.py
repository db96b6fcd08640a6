"""The one combining rule for the fine-tuned model and the TF-IDF baseline, and the baseline's file.

The trainer scores the ensemble with these functions and the daemon serves it with them, so what the
report measured is what the daemon does. numpy only at import; joblib/scikit-learn load on demand.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mailtriage.core.classifier import Prediction
# What a version may serve is defined with the training parameters (the config validates them there).
from mailtriage.core.training import SERVE_BASELINE, SERVE_CHOICES, SERVE_ENSEMBLE, SERVE_MODEL  # noqa: F401
from mailtriage.errors import ModelError

BASELINE_FILE = "baseline.joblib"
# manifest.json key: the TF-IDF baseline's confidences are temperature-scaled like the model's.
BASELINE_TEMPERATURE = "baseline_temperature"
# manifest.json key: the ensemble's own temperature. Averaging two calibrated distributions flattens
# them where the two disagree (BANKING77 10-shot: ensemble ECE 0.138 against the model's 0.046), so
# the mix gets a third temperature, fitted on validation mail like the other two.
ENSEMBLE_TEMPERATURE = "ensemble_temperature"
# Weight of the model in the ensemble when a manifest names none (versions before weights were tuned).
DEFAULT_ENSEMBLE_WEIGHT = 0.5


def ensemble_probs(model: Any, baseline: Any, weight: float = DEFAULT_ENSEMBLE_WEIGHT,
                   temperature: float = 1.0) -> np.ndarray:
    """``weight * model + (1 - weight) * baseline``, at ``temperature`` (``temper``); the trainer picks
    both on validation mail, never on the holdout, so the held-out score of the ensemble stays honest."""
    if not 0.0 <= weight <= 1.0:
        raise ModelError(f"ensemble weight {weight!r} is outside 0..1; expected the model's share "
                         "(manifest.json \"ensemble_weight\"), e.g. 0.5")
    mix = weight * np.asarray(model, dtype=np.float64) + (1.0 - weight) * np.asarray(baseline, dtype=np.float64)
    return temper(mix, temperature)


def temper(probs: Any, temperature: float) -> np.ndarray:
    """Probabilities at temperature ``T``: ``softmax(log p / T)``, the baseline's temperature scaling (it
    has no logits; log-probabilities are logits up to a constant per row). Zeros stay exactly zero and
    the arg-max never changes, so accuracy stays what it was and only the confidences move."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or not p.size:
        return p
    with np.errstate(divide="ignore"):
        z = np.log(p) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class TemperedPipeline:
    """The fitted baseline pipeline with its ``predict_proba`` temperature-scaled (T fitted by the
    trainer on validation mail); what both the baseline-only and the ensemble versions serve."""

    def __init__(self, pipeline: Any, temperature: float) -> None:
        self.pipeline = pipeline
        self.temperature = temperature
        self.classes_ = pipeline.classes_

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return temper(self.pipeline.predict_proba(list(texts)), self.temperature)

    def predict(self, texts: Sequence[str]) -> Any:
        return self.pipeline.predict(list(texts))  # a temperature never changes the arg-max


def _baseline_temperature(version_dir: Path) -> float:
    import json

    try:
        manifest = json.loads((Path(version_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 1.0  # load_classifier reports a missing or broken manifest itself
    value = manifest.get(BASELINE_TEMPERATURE, 1.0) if isinstance(manifest, dict) else 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ModelError(f"manifest.json of {str(version_dir)!r} has \"{BASELINE_TEMPERATURE}\": {value!r}; expected "
                         "a number > 0 (1 leaves the baseline's confidences as fitted)")
    return float(value)


def baseline_probs(pipeline: Any, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """``pipeline.predict_proba`` with its columns (``classes_``, sorted by scikit-learn) put in
    ``labels`` order; a label absent from the baseline's training data keeps probability 0."""
    raw = pipeline.predict_proba(list(texts))
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(texts), len(labels)), dtype=np.float64)
    for j, cls in enumerate(pipeline.classes_):
        if cls in index:
            out[:, index[cls]] = raw[:, j]
    return out


def save_baseline(pipeline: Any, version_dir: Path) -> Path:
    """Write the fitted scikit-learn pipeline next to the adapter (temp file + rename: never half a file)."""
    import joblib  # ships with scikit-learn

    path = Path(version_dir) / BASELINE_FILE
    tmp = path.with_name(f".{BASELINE_FILE}.{os.getpid()}")
    # compress=3: the TF-IDF vocabularies are mostly strings and shrink several-fold for ~no load time.
    joblib.dump(pipeline, tmp, compress=3)
    os.replace(tmp, path)
    return path


def load_baseline(version_dir: Path, labels: Sequence[str]) -> Any:
    """The pipeline saved by ``save_baseline``, checked to predict only ``labels``, its confidences
    scaled by the manifest's ``baseline_temperature`` (versions before it: 1, as they were served).

    joblib files are pickles, and unpickling runs code: this is a file of our own making, and it is
    loaded only from the model directory the admin controls (the same trust as the adapter weights).
    """
    path = Path(version_dir) / BASELINE_FILE
    if not path.is_file():
        raise ModelError(
            f"{str(version_dir)!r} says to serve the TF-IDF baseline (manifest.json \"serve\") but has no "
            f"{BASELINE_FILE}; the version is incomplete: retrain with mailtriage-train, or set \"serve\": \"model\" "
            "in its manifest.json to serve the fine-tuned model alone"
        )
    try:
        import joblib

        pipeline = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways; each means "unusable file"
        raise ModelError(
            f"{str(path)!r} could not be loaded ({type(exc).__name__}: {exc}); expected the TF-IDF baseline "
            "written by mailtriage-train with this scikit-learn version: retrain, or set \"serve\": \"model\" in "
            "manifest.json"
        ) from exc
    classes = getattr(pipeline, "classes_", None)
    if not hasattr(pipeline, "predict_proba") or classes is None:
        raise ModelError(f"{str(path)!r} holds a {type(pipeline).__name__}, not a fitted classifier with "
                         "predict_proba; retrain with mailtriage-train")
    unknown = sorted({str(c) for c in classes} - set(labels))
    if unknown:
        raise ModelError(f"{str(path)!r} predicts labels {unknown} that labels.json does not have ({list(labels)}); "
                         "the baseline belongs to another version: retrain with mailtriage-train")
    temperature = _baseline_temperature(version_dir)
    return pipeline if temperature == 1.0 else TemperedPipeline(pipeline, temperature)


class BaselineClassifier:
    """A version that serves its TF-IDF baseline alone (the trainer found it best on held-out mail).

    Same ``Classifier`` surface as the transformers classifier, without torch or the adapter weights
    in memory; ``serve`` says what it is.
    """

    serve = SERVE_BASELINE

    def __init__(self, pipeline: Any, labels: Sequence[str], *, path: Path, manifest: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.labels: tuple[str, ...] = tuple(labels)
        self.path = path
        self.version: str = path.name
        self.manifest = manifest
        self.device = "cpu"

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        if not texts:
            return []
        out = []
        for row in baseline_probs(self.pipeline, texts, self.labels).tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(label=self.labels[best], confidence=row[best],
                                  scores=dict(zip(self.labels, row, strict=True))))
        return out

    def __repr__(self) -> str:
        return f"BaselineClassifier(version={self.version!r}, labels={list(self.labels)}, serve='baseline')"

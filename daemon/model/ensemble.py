"""The one combining rule for the fine-tuned model and the TF-IDF baseline, and the baseline's file.

The trainer scores the ensemble with these functions and the daemon serves it with them, so what the
report measured is what the daemon does. numpy only at import; scikit-learn loads on demand.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mailtriage.core import explain
from mailtriage.core.classifier import Prediction
# What a version may serve is defined with the training parameters (the config validates them there).
from mailtriage.core.training import SERVE_BASELINE, SERVE_CHOICES, SERVE_ENSEMBLE, SERVE_MODEL  # noqa: F401
from mailtriage.errors import ModelError

if TYPE_CHECKING:  # manifest.py imports this module's constants
    from mailtriage.model.manifest import Manifest

BASELINE_FILE = "baseline.npz"
# What releases before baseline.npz wrote: a pickle, refused unread (see load_baseline).
LEGACY_BASELINE_FILE = "baseline.joblib"
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


def baseline_probs(pipeline: Any, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """``pipeline.predict_proba`` with its columns (``classes_``, sorted by scikit-learn) put in
    ``labels`` order; a label absent from the baseline's training data keeps probability 0."""
    return _in_label_order(pipeline.predict_proba(list(texts)), pipeline.classes_, labels)


def _in_label_order(raw: np.ndarray, classes: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((raw.shape[0], len(labels)), dtype=np.float64)
    for j, cls in enumerate(classes):
        if cls in index:
            out[:, index[cls]] = raw[:, j]
    return out


def baseline_scored(baseline: Any, texts: Sequence[str], labels: Sequence[str]) -> tuple[np.ndarray, Any]:
    """(``baseline_probs``, the TF-IDF feature matrix it was computed from): the features are computed
    once and serve both the probabilities and the word contributions. The matrix is None for a
    baseline that is not the served ``TfidfLogistic`` (a scikit-learn pipeline in the trainer)."""
    linear = _linear(baseline)
    if linear is None:
        return baseline_probs(baseline, texts, labels), None
    features = linear.features(texts)
    raw = linear.proba_of(features)
    if isinstance(baseline, TemperedPipeline):
        raw = temper(raw, baseline.temperature)
    return _in_label_order(raw, linear.classes_, labels), features


def _linear(baseline: Any) -> TfidfLogistic | None:
    inner = baseline.pipeline if isinstance(baseline, TemperedPipeline) else baseline
    return inner if isinstance(inner, TfidfLogistic) else None


# ---- explanations: the predictions with their evidence ---------------------------------------------


def predictions(probs: np.ndarray, labels: Sequence[str]) -> list[Prediction]:
    """One Prediction per row of ``probs`` (columns in ``labels`` order): the arg-max and every score."""
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append(Prediction(label=labels[best], confidence=row[best], scores=dict(zip(labels, row, strict=True))))
    return out


def explained_predictions(probs: np.ndarray, labels: Sequence[str], texts: Sequence[str], *, part: str,
                          weight: float | None = None, tfidf: Any = None, features: Any = None,
                          role: str = explain.ROLE_PART) -> list[Prediction]:
    """``predictions`` with their evidence: the served ``part``, the ensemble ``weight`` and, when
    there is a TF-IDF baseline (``tfidf``), the words that pushed each text toward its label and
    toward the runner-up (``term_evidence``). ``features``: the baseline's matrix of ``texts`` when
    already computed (``baseline_scored``), else computed here."""
    linear = _linear(tfidf)
    if linear is not None and features is None:
        features = linear.features(texts)
    out = []
    for i, pred in enumerate(predictions(probs, labels)):
        terms = None
        versus = explain.runner_up(pred.scores, pred.label)
        if linear is not None and versus is not None:
            terms = term_evidence(linear, features[i], pred.label, versus, role)
        out.append(Prediction(pred.label, pred.confidence, pred.scores, explain.Evidence(part, weight, terms)))
    return out


def term_evidence(linear: TfidfLogistic, row: Any, label: str, versus: str, role: str,
                  top: int = explain.TOP_TERMS) -> explain.Terms | None:
    """The exact linear contributions of one text's features (a 1 x features sparse row) to the
    baseline's ``score(label) - score(versus)``: tf-idf value x (coef[label] - coef[versus]) each,
    the ``top`` largest each way. None when the baseline never learned one of the two labels."""
    contributions, columns, bias = linear.contributions(row, label, versus)
    if contributions is None:
        return None
    gap = bias + float(contributions.sum())
    order = np.argsort(contributions, kind="stable")
    away = [k for k in order[:top] if contributions[k] < 0]
    toward = [k for k in order[::-1][:top] if contributions[k] > 0]

    def terms(ks: Sequence[int]) -> tuple[explain.Term, ...]:
        return tuple(explain.Term(*linear.term(int(columns[k])), float(contributions[k])) for k in ks)

    return explain.Terms(role=role, versus=versus, gap=gap, bias=bias, toward=terms(toward), away=terms(away))


def view_baseline(version_dir: Path, labels: Sequence[str]) -> Any:
    """The version's TF-IDF baseline for a "TF-IDF view" when the model alone serves, or None when the
    version has none; a baseline that cannot be loaded only costs the view (logged), never a message."""
    if not (Path(version_dir) / BASELINE_FILE).is_file():
        return None
    try:
        return load_baseline(version_dir, labels)
    except ModelError as exc:
        import structlog

        structlog.get_logger(__name__).warning("tfidf_view_unavailable", path=str(version_dir), error=str(exc))
        return None


# ---- the baseline's file: numbers and words only ----------------------------------------------------
#
# A model directory must never be able to run code in the daemon, so the baseline is not pickled
# (joblib): what a fitted TF-IDF + logistic regression needs to predict is its vectorizers' settings
# and vocabularies, their idf weights, and the linear map (coefficients, intercepts, classes). These
# go into one .npz holding plain arrays (read with allow_pickle=False) and one JSON document as bytes.
# The loader rebuilds scikit-learn's vectorizers from an allow-list of settings and computes the
# logistic regression itself, so nothing in the file names a class or a function to call; a version
# also survives scikit-learn upgrades that change pickled internals.

BASELINE_FORMAT = "mailtriage-tfidf-logreg/1"
_SPEC = "spec"
# The vectorizer settings that shape transform(); those that only matter while fitting (min_df,
# max_features...) are not needed to serve. Values are checked against these types and choices.
_VECTORIZER_SETTINGS: dict[str, tuple[type | tuple[type, ...], tuple[Any, ...] | None]] = {
    "analyzer": (str, ("word", "char", "char_wb")),
    "binary": (bool, None),
    "decode_error": (str, ("strict", "ignore", "replace")),
    "encoding": (str, None),
    "input": (str, ("content",)),
    "lowercase": (bool, None),
    "ngram_range": (list, None),
    "norm": ((str, type(None)), ("l1", "l2", None)),
    "smooth_idf": (bool, None),
    "stop_words": ((str, list, type(None)), None),
    "strip_accents": ((str, type(None)), ("ascii", "unicode", None)),
    "sublinear_tf": (bool, None),
    "token_pattern": ((str, type(None)), None),
    "use_idf": (bool, (True,)),
    "dtype": (str, ("float64", "float32")),
}


def save_baseline(pipeline: Any, version_dir: Path) -> Path:
    """Write the fitted scikit-learn pipeline (``FeatureUnion`` of ``TfidfVectorizer`` s, then a
    ``LogisticRegression``) as ``baseline.npz`` next to the adapter: temp file + rename, mode 0600."""
    from mailtriage.model import modeldir

    spec, arrays = _export(pipeline)
    payload = json.dumps(spec, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    path = Path(version_dir) / BASELINE_FILE

    def write(fh: Any) -> None:
        np.savez_compressed(fh, **arrays, **{_SPEC: np.frombuffer(payload, dtype=np.uint8)})

    modeldir.write_private(path, write)
    return path


def _export(pipeline: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    steps = dict(getattr(pipeline, "named_steps", {}))
    features, clf = steps.get("features"), steps.get("clf")
    parts = getattr(features, "transformer_list", None)
    if parts is None or clf is None or getattr(features, "transformer_weights", None) is not None:
        raise ModelError(f"cannot save a {type(pipeline).__name__} as the baseline: expected a fitted Pipeline "
                         "of ('features', FeatureUnion of TfidfVectorizer) and ('clf', LogisticRegression)")
    spec: dict[str, Any] = {"format": BASELINE_FORMAT, "classes": [str(c) for c in clf.classes_], "parts": []}
    arrays: dict[str, np.ndarray] = {}
    for i, (name, vectorizer) in enumerate(parts):
        params = vectorizer.get_params()
        if params.get("preprocessor") is not None or params.get("tokenizer") is not None or not isinstance(
                params.get("analyzer"), str):
            raise ModelError(f"baseline part {name!r} uses a custom function (preprocessor, tokenizer or analyzer); "
                             "only settings can be saved, not code")
        settings = {key: params[key] for key in _VECTORIZER_SETTINGS}
        settings["ngram_range"] = [int(n) for n in settings["ngram_range"]]
        settings["dtype"] = np.dtype(settings["dtype"]).name
        if isinstance(settings["stop_words"], (list, tuple, frozenset, set)):
            settings["stop_words"] = sorted(settings["stop_words"])
        terms = [""] * len(vectorizer.vocabulary_)
        for term, column in vectorizer.vocabulary_.items():
            terms[int(column)] = term
        spec["parts"].append({"name": str(name), "settings": settings, "vocabulary": terms})
        arrays[f"idf_{i}"] = np.asarray(vectorizer.idf_, dtype=np.float64)
    arrays["coef"] = np.asarray(clf.coef_, dtype=np.float64)
    arrays["intercept"] = np.asarray(clf.intercept_, dtype=np.float64)
    return spec, arrays


def load_baseline(version_dir: Path, labels: Sequence[str], temperature: float | None = None) -> Any:
    """The baseline saved by ``save_baseline``, checked to predict only ``labels``, its confidences
    scaled by ``temperature`` (None: the manifest's ``baseline_temperature``; versions before it: 1).

    Only ``baseline.npz`` is read, with ``allow_pickle=False``: no code runs from the model directory.
    A version that has only the pickled ``baseline.joblib`` of older releases is refused, unread.
    """
    path = Path(version_dir) / BASELINE_FILE
    if not path.is_file():
        if (Path(version_dir) / LEGACY_BASELINE_FILE).exists():
            raise ModelError(
                f"{str(version_dir)!r} keeps its TF-IDF baseline in {LEGACY_BASELINE_FILE}, a Python pickle from an "
                f"older mailtriage; pickles are no longer loaded from a model directory because loading one can run "
                f"any code. Retrain with mailtriage-train (it writes {BASELINE_FILE}; the gate replaces a current "
                "version it cannot load), or set \"serve\": \"model\" in its manifest.json to serve the fine-tuned "
                "model alone meanwhile"
            )
        raise ModelError(
            f"{str(version_dir)!r} says to serve the TF-IDF baseline (manifest.json \"serve\") but has no "
            f"{BASELINE_FILE}; the version is incomplete: retrain with mailtriage-train, or set \"serve\": \"model\" "
            "in its manifest.json to serve the fine-tuned model alone"
        )
    baseline = _import(path)
    unknown = sorted(set(baseline.classes_) - set(labels))
    if unknown:
        raise ModelError(f"{str(path)!r} predicts labels {unknown} that labels.json does not have ({list(labels)}); "
                         "the baseline belongs to another version: retrain with mailtriage-train")
    if temperature is None:
        from mailtriage.model.manifest import Manifest

        manifest = Manifest.load_or_default(version_dir)
        temperature = manifest.baseline_temperature if manifest is not None else 1.0
    return baseline if temperature == 1.0 else TemperedPipeline(baseline, temperature)


def _import(path: Path) -> TfidfLogistic:
    def broken(what: str) -> ModelError:
        return ModelError(f"{str(path)!r} is not a usable TF-IDF baseline ({what}); expected the {BASELINE_FORMAT} "
                          "file written by mailtriage-train: retrain, or set \"serve\": \"model\" in manifest.json")

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as exc:  # noqa: BLE001 - a damaged zip or array fails in many ways; each means "unusable"
        raise broken(f"{type(exc).__name__}: {exc}") from exc
    try:
        spec = json.loads(arrays.pop(_SPEC).astype(np.uint8).tobytes().decode("utf-8"))
    except (KeyError, ValueError) as exc:
        raise broken(f"no readable {_SPEC!r} entry: {exc}") from exc
    if not isinstance(spec, dict) or spec.get("format") != BASELINE_FORMAT:
        raise broken(f"format {spec.get('format') if isinstance(spec, dict) else spec!r}")
    classes = spec.get("classes")
    parts = spec.get("parts")
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise broken(f"classes {classes!r}, expected 2 or more distinct label names")
    if not isinstance(parts, list) or not parts:
        raise broken("no feature parts")
    vectorizers = []
    width = 0
    for i, part in enumerate(parts):
        idf = arrays.get(f"idf_{i}")
        vectorizers.append(_vectorizer(part, idf, broken))
        width += len(part["vocabulary"])
    coef, intercept = arrays.get("coef"), arrays.get("intercept")
    rows = 1 if len(classes) == 2 else len(classes)
    for name, array, shape in (("coef", coef, (rows, width)), ("intercept", intercept, (rows,))):
        if array is None or array.dtype != np.float64 or array.shape != shape or not np.isfinite(array).all():
            raise broken(f"{name} is {None if array is None else f'{array.dtype} {array.shape}'}, expected finite "
                         f"float64 of shape {shape}")
    return TfidfLogistic(vectorizers, coef, intercept, classes)


def _vectorizer(part: Any, idf: np.ndarray | None, broken: Any) -> Any:
    """A scikit-learn TfidfVectorizer rebuilt from allow-listed settings, a vocabulary and idf weights."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    settings = part.get("settings") if isinstance(part, dict) else None
    terms = part.get("vocabulary") if isinstance(part, dict) else None
    if not isinstance(settings, dict) or set(settings) != set(_VECTORIZER_SETTINGS):
        raise broken(f"vectorizer settings {sorted(settings) if isinstance(settings, dict) else settings!r}, expected "
                     f"exactly {sorted(_VECTORIZER_SETTINGS)}")
    for key, (types, choices) in _VECTORIZER_SETTINGS.items():
        value = settings[key]
        if not isinstance(value, types) or (choices is not None and value not in choices):
            raise broken(f"vectorizer setting {key} = {value!r}")
    low_high = settings["ngram_range"]
    if (len(low_high) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in low_high)
            or not 1 <= low_high[0] <= low_high[1] <= 16):
        raise broken(f"ngram_range {low_high!r}")
    stop = settings["stop_words"]
    if isinstance(stop, str) and stop != "english" or isinstance(stop, list) and not all(isinstance(w, str) for w in stop):
        raise broken(f"stop_words {stop!r}")
    if not isinstance(terms, list) or not terms or not all(isinstance(t, str) for t in terms) or len(set(terms)) != len(terms):
        raise broken("a vocabulary that is not a list of distinct strings")
    if idf is None or idf.dtype != np.float64 or idf.shape != (len(terms),) or not np.isfinite(idf).all():
        raise broken(f"idf weights that do not fit the {len(terms)}-term vocabulary")
    kwargs = dict(settings, ngram_range=tuple(low_high), dtype=np.dtype(settings["dtype"]).type)
    vectorizer = TfidfVectorizer(**kwargs, vocabulary={t: i for i, t in enumerate(terms)})
    vectorizer.idf_ = idf
    return vectorizer


class TfidfLogistic:
    """The baseline as served: TF-IDF features (scikit-learn's vectorizers with the saved vocabulary and
    idf) into the saved logistic regression, computed as scikit-learn computes ``predict_proba``
    (binary: the logistic of one score; otherwise the softmax of one score per class)."""

    def __init__(self, vectorizers: Sequence[Any], coef: np.ndarray, intercept: np.ndarray,
                 classes: Sequence[str]) -> None:
        self.vectorizers = list(vectorizers)
        self.coef = coef
        self.intercept = intercept
        self.classes_ = np.asarray(classes, dtype=object)
        self._terms: list[tuple[int, list[str], str]] | None = None  # built on the first explanation

    def features(self, texts: Sequence[str]) -> Any:
        """The TF-IDF features of ``texts``: a sparse CSR matrix, the parts' columns side by side."""
        from scipy import sparse

        return sparse.hstack([v.transform(list(texts)) for v in self.vectorizers]).tocsr()

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        return self.scores_of(self.features(texts))

    def scores_of(self, features: Any) -> np.ndarray:
        return np.asarray(features @ self.coef.T) + self.intercept

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.proba_of(self.features(texts))

    def proba_of(self, features: Any) -> np.ndarray:
        scores = self.scores_of(features)
        if self.coef.shape[0] == 1:
            from scipy.special import expit

            p = expit(scores[:, 0])
            return np.vstack([1 - p, p]).T
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        return scores

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return self.classes_[self.predict_proba(texts).argmax(axis=1)]

    def contributions(self, row: Any, label: str, versus: str) -> tuple[np.ndarray | None, np.ndarray, float]:
        """(contribution of each nonzero feature of ``row`` to ``score(label) - score(versus)``, their
        columns, the intercepts' difference); contributions None when a label is not a class here.

        A binary model keeps one row of coefficients, the score of ``classes_[1]`` against
        ``classes_[0]``; its sign flips when ``label`` is ``classes_[0]``.
        """
        classes = list(self.classes_)
        columns = np.asarray(row.indices)
        if label not in classes or versus not in classes or label == versus:
            return None, columns, 0.0
        a, b = classes.index(label), classes.index(versus)
        values = np.asarray(row.data, dtype=np.float64)
        if self.coef.shape[0] == 1:
            sign = 1.0 if a == 1 else -1.0
            return values * (sign * self.coef[0, columns]), columns, sign * float(self.intercept[0])
        diff = self.coef[a, columns] - self.coef[b, columns]
        return values * diff, columns, float(self.intercept[a] - self.intercept[b])

    def term(self, column: int) -> tuple[str, str]:
        """(text, kind) of a feature column: a word (n-gram) or a char n-gram, per its vectorizer."""
        if self._terms is None:
            self._terms = []
            for v in self.vectorizers:
                names = [""] * len(v.vocabulary)
                for text, i in v.vocabulary.items():
                    names[i] = text
                kind = explain.KIND_WORD if v.analyzer == "word" else explain.KIND_CHAR
                self._terms.append((len(names), names, kind))
        for width, names, kind in self._terms:
            if column < width:
                return names[column], kind
            column -= width
        raise IndexError(f"feature column {column} is past the baseline's vocabulary")


class BaselineClassifier:
    """A version that serves its TF-IDF baseline alone (the trainer found it best on held-out mail).

    Same ``Classifier`` surface as the transformers classifier, without torch or the adapter weights
    in memory; ``serve`` says what it is.
    """

    serve = SERVE_BASELINE

    def __init__(self, pipeline: Any, labels: Sequence[str], *, path: Path, manifest: Manifest) -> None:
        self.pipeline = pipeline
        self.labels: tuple[str, ...] = tuple(labels)
        self.path = path
        self.version: str = path.name
        self.manifest = manifest
        self.device = "cpu"

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        if not texts:
            return []
        return predictions(baseline_probs(self.pipeline, texts, self.labels), self.labels)

    def classify_explained(self, texts: Sequence[str]) -> list[Prediction]:
        """``classify`` with evidence: the same TF-IDF features give the scores and the word contributions."""
        if not texts:
            return []
        probs, features = baseline_scored(self.pipeline, texts, self.labels)
        return explained_predictions(probs, self.labels, texts, part=explain.PART_BASELINE, tfidf=self.pipeline,
                                     features=features)

    def __repr__(self) -> str:
        return f"BaselineClassifier(version={self.version!r}, labels={list(self.labels)}, serve='baseline')"

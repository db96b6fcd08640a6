"""Explanations: the exact TF-IDF contributions, the stored JSON and its bound, the text and the
X-Mailtriage-Why renderings, every served part, and `mailtriage explain` / `classify --explain`.

The contribution math is checked against scikit-learn's own decision function of the fitted
pipeline, on a tiny baseline fitted in the test (no fake): the saved arrays must give back exactly
what the linear model computes.
"""

from __future__ import annotations

import json
import shutil
import warnings
from email import message_from_bytes
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mailtriage.core import explain
from mailtriage.core.classifier import Prediction
from mailtriage.core.explain import Evidence, Explanation, Term, Terms
from mailtriage.core.pipeline import Rules, route
from mailtriage.core.routing import Decision
from mailtriage.core.tagging import add_headers
from mailtriage.model import ensemble, modeldir
from tests.models import TOY_EXAMPLES, TOY_LABELS, toy_dataset

TEXTS = [t for t, _ in TOY_EXAMPLES[::4]] + ["", "hello", "My invoice is wrong, I want a refund", "Rechnung! 💶 refund?",
                                          "invoice " * 300]
CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}


def _fitted(labels: tuple[str, ...], texts: list[tuple[str, str]] | None = None) -> Any:
    """The trainer's baseline shape (word 1-2 grams + char_wb 2-5 grams, logistic regression), fitted."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    rows = [(t, y) for t, y in (texts or toy_dataset()[0]) if y in labels]
    pipeline = Pipeline([
        ("features", FeatureUnion([("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
                                   ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))])),
        ("clf", LogisticRegression(C=30.0, solver="saga", max_iter=50, tol=1e-3, random_state=0)),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipeline.fit([t for t, _ in rows], [y for _, y in rows])


def _saved(tmp_path: Path, labels: tuple[str, ...], texts: list[tuple[str, str]] | None = None,
           temperature: float = 1.0) -> tuple[Any, Any]:
    pipeline = _fitted(labels, texts)
    ensemble.save_baseline(pipeline, tmp_path)
    return pipeline, ensemble.load_baseline(tmp_path, labels, temperature=temperature)


# ---- the contribution math --------------------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize("labels", [TOY_LABELS, TOY_LABELS[:2]], ids=["three-classes", "binary"])
def test_contributions_sum_to_the_score_gap_the_linear_model_computes(tmp_path: Path, labels: tuple[str, ...]) -> None:
    pipeline, baseline = _saved(tmp_path, labels)
    scores = pipeline.decision_function(TEXTS)
    if scores.ndim == 1:  # binary: scikit-learn's one score is classes_[1] against classes_[0]
        scores = np.vstack([np.zeros_like(scores), scores]).T
    classes = list(pipeline.classes_)
    features = baseline.features(TEXTS)
    for i in range(len(TEXTS)):
        for a in classes:
            for b in classes:
                if a == b:
                    continue
                contributions, columns, bias = baseline.contributions(features[i], a, b)
                assert contributions is not None and len(contributions) == len(columns) == features[i].nnz
                want = scores[i, classes.index(a)] - scores[i, classes.index(b)]
                assert abs(bias + contributions.sum() - want) < 1e-9
                terms = ensemble.term_evidence(baseline, features[i], a, b, explain.ROLE_PART)
                assert terms is not None and abs(terms.gap - want) < 1e-9 and terms.versus == b
                ups, downs = [t.weight for t in terms.toward], [t.weight for t in terms.away]
                assert len(ups) <= 8 and len(downs) <= 8
                assert ups == sorted(ups, reverse=True) and all(w > 0 for w in ups)
                assert downs == sorted(downs) and all(w < 0 for w in downs)
                if len(contributions):
                    top = max(contributions)
                    assert (ups[0] == pytest.approx(top)) if top > 0 else not ups
                    assert len(ups) == min(8, int((contributions > 0).sum()))


@pytest.mark.pure
def test_terms_are_the_words_and_char_ngrams_the_message_holds(tmp_path: Path) -> None:
    _pipeline, baseline = _saved(tmp_path, TOY_LABELS)
    row = baseline.features(["Please send the invoice again"])[0]
    terms = ensemble.term_evidence(baseline, row, "billing", "refunds", explain.ROLE_PART)
    assert terms is not None
    words = {t.text for t in terms.toward if t.kind == explain.KIND_WORD}
    chars = [t.text for t in (*terms.toward, *terms.away) if t.kind == explain.KIND_CHAR]
    assert "invoice" in words
    assert chars and all(2 <= len(c) <= 5 and c.strip() in " please send the invoice again " for c in chars)
    # Each shown weight is exactly that feature's tf-idf value x the coefficient difference.
    word_vec, char_vec = baseline.vectorizers
    column = word_vec.vocabulary["invoice"]
    a, b = list(baseline.classes_).index("billing"), list(baseline.classes_).index("refunds")
    value = row[0, column]
    (shown,) = [t.weight for t in terms.toward if t.text == "invoice"]
    assert shown == pytest.approx(value * (baseline.coef[a, column] - baseline.coef[b, column]), abs=1e-12)


@pytest.mark.pure
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_explained_baseline_predictions_are_its_predictions(tmp_path: Path, temperature: float) -> None:
    from mailtriage.model.manifest import Manifest

    _pipeline, baseline = _saved(tmp_path, TOY_LABELS, temperature=temperature)
    clf = ensemble.BaselineClassifier(baseline, TOY_LABELS, path=tmp_path, manifest=Manifest())
    plain, explained = clf.classify(TEXTS), clf.classify_explained(TEXTS)
    assert [(p.label, dict(p.scores)) for p in plain] == [(p.label, dict(p.scores)) for p in explained]
    assert all(p.evidence is None for p in plain)
    for p in explained:
        assert p.evidence is not None and p.evidence.part == explain.PART_BASELINE and p.evidence.weight is None
        assert p.evidence.terms is not None and p.evidence.terms.role == explain.ROLE_PART
        assert p.evidence.terms.versus == explain.top_labels(p.scores)[1][0]


# ---- the stored record ------------------------------------------------------------------------------


def _explanation(**overrides: Any) -> Explanation:
    values: dict[str, Any] = dict(
        label="billing", confidence=0.93124, top=(("billing", 0.93124), ("refunds", 0.05), ("login", 0.01876)),
        threshold=0.6, unsure=False, version="20250101-120000", part=explain.PART_ENSEMBLE, weight=0.5,
        terms=Terms(explain.ROLE_PART, "refunds", 3.21, -0.12,
                    (Term("invoice", "word", 1.2345), Term(" inv", "char", 0.2)), (Term("refund", "word", -0.41),)),
    )
    values.update(overrides)
    return Explanation(**values)


@pytest.mark.pure
def test_the_json_round_trips_and_is_documented_shape() -> None:
    e = _explanation()
    data = json.loads(e.to_json())
    assert data == {
        "v": 1, "label": "billing", "confidence": 0.9312, "top": [["billing", 0.9312], ["refunds", 0.05], ["login", 0.0188]],
        "threshold": 0.6, "unsure": False, "version": "20250101-120000", "part": "ensemble", "weight": 0.5,
        "tfidf": {"role": "part", "versus": "refunds", "gap": 3.21, "bias": -0.12,
                  "toward": [["invoice", "word", 1.2345], [" inv", "char", 0.2]], "away": [["refund", "word", -0.41]]},
    }
    back = Explanation.from_json(e.to_json())
    assert back.to_json() == e.to_json()
    assert json.loads(_explanation(terms=None, part="model", weight=None).to_json())["tfidf"] is None
    for junk in ('{"v": 99}', '{"v": 1}', "[]", "not json", '{"v": 1, "tfidf": {"toward": 3}}'):
        with pytest.raises(ValueError, match="not a mailtriage explanation"):
            Explanation.from_json(junk)


@pytest.mark.pure
def test_the_json_stays_under_2_kb_whatever_the_strings() -> None:
    nasty = '"\\\x01\u202e💶' * 400  # escapes (6 bytes a char), 4-byte UTF-8, a bidi override
    terms = Terms(explain.ROLE_VIEW, nasty, 1e300, float("nan"),
                  tuple(Term(nasty, "char", 9.87654321) for _ in range(50)), tuple(Term(nasty, "word", -1.0) for _ in range(50)))
    e = _explanation(label=nasty, top=((nasty, 0.5), (nasty, 0.25), (nasty, 0.25)), version=nasty, terms=terms,
                     confidence=float("nan"))
    text = e.to_json()
    assert len(text.encode("utf-8")) <= explain.MAX_JSON_BYTES
    data = json.loads(text)  # valid JSON: no NaN token, cut strings still strings
    assert data["confidence"] is None and data["tfidf"]["bias"] is None
    back = Explanation.from_json(text)  # the console reads it back
    assert back.confidence != back.confidence and back.label.endswith("…") and len(back.terms.toward) == 8  # type: ignore[union-attr]
    assert len(data["tfidf"]["toward"]) == len(data["tfidf"]["away"]) == 8


@pytest.mark.pure
def test_a_hostile_long_message_gets_a_bounded_explanation(tmp_path: Path) -> None:
    # The baseline learned long and odd tokens from mail (a base64 run, a long URL, quotes); a 2 MB
    # message made of them and of noise still gets an explanation under the bound.
    from mailtriage.core.mailtext import mail_text
    from mailtriage.model.manifest import Manifest

    odd = ["A" * 3000, "https://example.com/" + "x" * 2000, 'say"hello"\\now', "ß" * 900]
    train = [(f"{t} {w}", y) for (t, y) in toy_dataset()[0] for w in odd]
    _pipeline, baseline = _saved(tmp_path, TOY_LABELS, train)
    clf = ensemble.BaselineClassifier(baseline, TOY_LABELS, path=tmp_path, manifest=Manifest())
    body = (" ".join(odd) + " invoice refund password \u202e\x01 ") * 300
    raw = b"From: a@example.com\r\nSubject: " + b"invoice " * 2000 + b"\r\n\r\n" + body.encode() * 2
    assert len(raw) > 2_000_000
    (pred,) = clf.classify_explained([mail_text(raw)])
    e = explain.explain(pred.evidence, pred.label, pred.confidence, pred.scores, 0.6, False, "v1")
    assert e.terms is not None and len(e.terms.toward) + len(e.terms.away) > 8
    assert len(e.to_json().encode("utf-8")) <= explain.MAX_JSON_BYTES


# ---- renderings -------------------------------------------------------------------------------------


@pytest.mark.pure
def test_render_names_the_part_the_threshold_and_the_words() -> None:
    lines = explain.render(_explanation())
    assert lines[0] == "filed: billing at 93.1%, at or above the threshold 60.0%"
    assert lines[1] == "top labels: billing 93.1%, refunds 5.0%, login 1.9%"
    assert "ensemble" in lines[2] and "model weight 0.50" in lines[2] and "20250101-120000" in lines[2]
    assert lines[-2] == 'toward billing: invoice +1.234, " inv" +0.200'.join(["  ", ""])
    assert lines[-1] == "  toward refunds: refund -0.410"
    view = explain.render(_explanation(part="model", weight=None, unsure=True, confidence=0.41,
                                       terms=Terms(explain.ROLE_VIEW, "refunds", 1.0, 0.0, (), ())))
    assert view[0].startswith("unsure: billing at 41.0%, below the threshold") and "unsure folder" in view[0]
    assert any(line.startswith("TF-IDF view") for line in view)
    assert explain.render(_explanation(part="model", weight=None, terms=None))[-1].startswith("words: none")


@pytest.mark.pure
def test_the_why_header_is_ascii_folded_bounded_and_cannot_add_a_field() -> None:
    evil = "x\r\nBcc: victim@example.com\r\n\r\nbody"
    e = _explanation(label="billing", version="v1\r\nX-Injected: 1",
                     terms=Terms(explain.ROLE_PART, "refunds", 1.0, 0.0, tuple(Term(evil, "word", 1.0) for _ in range(8)), ()))
    why = explain.why_header(e)
    assert why.isascii() and len(why) < 400
    lines = why.split("\r\n")
    assert all(line.startswith(" ") for line in lines[1:]) and "\r" not in why.replace("\r\n", "")
    assert "\n" not in why.replace("\r\n", "")
    assert all(len(line) <= 78 for line in [f"X-Mailtriage-Why: {lines[0]}", *lines[1:]])
    assert ":" not in why  # nothing can look like the start of a field
    tagged = add_headers(b"Subject: hi\r\nX-Mailtriage-Why: forged by sender\r\n\r\nbody\r\n",
                         Decision("billing", 0.93, False, "Support/Billing"), why)
    msg = message_from_bytes(tagged)
    assert msg.keys() == ["X-Mailtriage-Category", "X-Mailtriage-Confidence", "X-Mailtriage-Why", "Subject"]
    assert msg.get_all("X-Mailtriage-Why") and "forged" not in tagged.decode()
    assert "filed=billing" in msg["X-Mailtriage-Why"] and "words=x__Bcc__victim" in msg["X-Mailtriage-Why"]


@pytest.mark.pure
def test_route_attaches_the_explanation_with_the_threshold_and_the_outcome() -> None:
    evidence = Evidence(explain.PART_BASELINE, None, None)
    sure = Prediction("billing", 0.9, {"billing": 0.9, "login": 0.06, "refunds": 0.04}, evidence)
    unsure = Prediction("login", 0.5, {"billing": 0.3, "login": 0.5, "refunds": 0.2})
    a, b = route([sure, unsure], "v7", 2, Rules(CATEGORIES, 0.6, "Support/Unsure"))
    assert a.explanation is not None and b.explanation is not None
    assert (a.explanation.part, a.explanation.unsure, a.explanation.threshold, a.explanation.version) == (
        "baseline", False, 0.6, "v7")
    assert b.explanation.part == explain.PART_UNKNOWN and b.explanation.unsure and b.decision.unsure
    assert b.explanation.top == (("login", 0.5), ("billing", 0.3), ("refunds", 0.2))


# ---- every served part, and the command line (a tiny real model) ----------------------------------------


def _version(tiny_model_dir: Path, dest: Path, serve: str, baseline: bool) -> Path:
    version = dest / f"v-{serve}-{int(baseline)}"
    shutil.copytree(modeldir.resolve(tiny_model_dir), version)
    manifest = modeldir.read_manifest(version)
    manifest["serve"] = serve
    modeldir.write_manifest(version, manifest)
    if baseline:
        ensemble.save_baseline(_fitted(TOY_LABELS), version)
    return version


@pytest.mark.component
def test_each_served_part_explains_itself(tiny_model_dir: Path, tmp_path: Path) -> None:
    from mailtriage.model.transformers import load_classifier

    cases = [("model", False, explain.PART_MODEL, None), ("model", True, explain.PART_MODEL, explain.ROLE_VIEW),
             ("ensemble", True, explain.PART_ENSEMBLE, explain.ROLE_PART),
             ("baseline", True, explain.PART_BASELINE, explain.ROLE_PART)]
    for serve, with_baseline, part, role in cases:
        clf = load_classifier(_version(tiny_model_dir, tmp_path, serve, with_baseline), device="cpu", batch_size=4)
        plain, explained = clf.classify(TEXTS), clf.classify_explained(TEXTS)
        assert [p.label for p in plain] == [p.label for p in explained]
        assert np.allclose([list(p.scores.values()) for p in plain], [list(p.scores.values()) for p in explained])
        for p in explained:
            assert p.evidence is not None and p.evidence.part == part, serve
            assert p.evidence.weight == (clf.ensemble_weight if part == explain.PART_ENSEMBLE else None)
            assert (p.evidence.terms.role if p.evidence.terms else None) == role, (serve, with_baseline)
        if role is not None:
            # "invoice" pushes toward billing in the TF-IDF words, whichever part decided.
            billing = explained[TEXTS.index("My invoice is wrong, I want a refund")]
            terms = billing.evidence.terms  # type: ignore[union-attr]
            assert terms is not None
            words = {t.text for t in (*terms.toward, *terms.away)}
            assert {"invoice", "refund"} & words


def _demo_version(tmp_path: Path) -> tuple[Path, Path]:
    """A demo mailbox's history and a version serving a TF-IDF baseline fitted on it (no adapter is
    loaded for such a version; its files only need to exist)."""
    from demo.corpus import CATEGORIES as DEMO_CATEGORIES, generate
    from mailtriage.core.labels import LabelSet
    from mailtriage.core.mailtext import MAILTEXT_VERSION, mail_text
    from mailtriage_trainer.evaluate import Baseline

    corpus = tmp_path / "corpus"
    generate(corpus, per_category=12, inbox=4, seed=3)
    labels = tuple(DEMO_CATEGORIES)
    texts = [(mail_text(f.read_bytes()), label) for label in labels for f in sorted((corpus / "history" / label).iterdir())]
    version = tmp_path / "models" / "v1"
    version.mkdir(parents=True)
    LabelSet(labels).save(version)
    (version / modeldir.ADAPTER_CONFIG_FILE).write_text("{}")
    modeldir.write_manifest(version, {"serve": "baseline", "mailtext_version": MAILTEXT_VERSION})
    Baseline(labels).fit([t for t, _ in texts], [y for _, y in texts]).save(version)
    return corpus, version


@pytest.mark.component
def test_mailtriage_explain_prints_the_top_words_of_a_demo_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailtriage.cli.main import main

    corpus, version = _demo_version(tmp_path)
    message = sorted((corpus / "history" / "refunds").iterdir())[0]
    assert main(["explain", "--model", str(version), str(message)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(("filed: ", "unsure: "))
    assert out[1].startswith("top labels: ") and out[1].count("%") == 3
    assert "the TF-IDF baseline alone" in out[2] and "v1" in out[2]
    toward = next(line for line in out if line.startswith("  toward ") and not line.endswith("none"))
    assert len(toward.split(", ")) >= 3  # the words that pushed, each with its contribution
    label = out[0].split()[1]
    assert main(["explain", "--json", "--model", str(version), str(message)]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert stored["label"] == label and stored["part"] == "baseline" and len(stored["tfidf"]["toward"]) > 0
    # classify --explain: the same explanation inside each JSON line; without it the line is as before.
    inbox = sorted((corpus / "inbox").iterdir())[:2]
    assert main(["classify", "--explain", "--model", str(version), *map(str, inbox)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == list(map(str, inbox))
    assert all(r["explanation"]["label"] == r["label"] and r["explanation"]["v"] == 1 for r in rows)
    assert main(["classify", "--model", str(version), str(inbox[0])]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"file", "label", "confidence", "unsure"}

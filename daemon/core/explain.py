"""Why a message went where it went: the explanation stored with every decision, and its renderings.

The classifier says what it can about how it scored a text (``Evidence``: which part served, the
ensemble weight, the TF-IDF part's word contributions); routing adds the rest (top labels, the
threshold, the outcome, the model version) into one ``Explanation``. It is stored as JSON in the state
database's ``messages.explanation`` column, printed by ``mailtriage explain`` and summarised into the
opt-in ``X-Mailtriage-Why`` header. Pure: values in, values out; no numpy, no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Which part of a version produced the served scores (``Explanation.part``).
PART_MODEL = "model"        # the fine-tuned model alone
PART_BASELINE = "baseline"  # the TF-IDF baseline alone
PART_ENSEMBLE = "ensemble"  # weight * model + (1 - weight) * baseline
PART_REMOTE = "remote"      # an external inference server: nothing is known of how it scored
PART_UNKNOWN = "unknown"    # a classifier that gives no evidence (a test double)

# What the TF-IDF words are (``Terms.role``): the words of a part that decided (alone or in the
# ensemble), or, when the model alone served, the words the version's baseline weighs, shown as a
# view of the message that played no part in the decision.
ROLE_PART = "part"
ROLE_VIEW = "view"

KIND_WORD = "word"  # a word (or word n-gram) feature
KIND_CHAR = "char"  # a character n-gram feature

FORMAT_VERSION = 1
TOP_LABELS = 3
TOP_TERMS = 8
# The stored JSON never exceeds this many bytes (UTF-8), whatever the message or the config holds.
MAX_JSON_BYTES = 2048
# Per string, as JSON-encoded UTF-8 bytes: labels and versions come from the config and the model
# directory, terms from the baseline's vocabulary (words learned from mail). Clipped, so the bound
# above holds for any of them.
_LABEL_BYTES = 64
_VERSION_BYTES = 64
_TERM_BYTES = 40
_WHY_MAX = 300  # characters of the X-Mailtriage-Why value, folding excluded
_FOLD_AT = 76


@dataclass(frozen=True)
class Term:
    """One feature's exact linear contribution to ``score(label) - score(versus)`` in the TF-IDF
    part: its tf-idf value in the message times ``coef[label] - coef[versus]``."""

    text: str     # the word or word n-gram; for a char n-gram the n-gram itself (spaces included)
    kind: str     # KIND_WORD or KIND_CHAR
    weight: float


@dataclass(frozen=True)
class Terms:
    """The TF-IDF part's word evidence for ``label`` against ``versus`` (the runner-up).

    ``gap`` is the part's logistic-regression score of the label minus that of ``versus``, before
    any temperature: it equals ``bias`` plus the contributions of every feature of the message (the
    ``toward`` and ``away`` lists are the largest of them).
    """

    role: str                    # ROLE_PART or ROLE_VIEW
    versus: str
    gap: float
    bias: float                  # intercept[label] - intercept[versus]
    toward: tuple[Term, ...]     # the largest positive contributions, largest first (at most TOP_TERMS)
    away: tuple[Term, ...]       # the most negative ones, most negative first (at most TOP_TERMS)


@dataclass(frozen=True)
class Evidence:
    """What a classifier knows of how it scored one text; ``Prediction.evidence``."""

    part: str
    weight: float | None = None  # the model's share in an ensemble, else None
    terms: Terms | None = None


@dataclass(frozen=True)
class Explanation:
    """Why one message was decided as it was; what the state database keeps per decision.

    JSON shape (``to_json``; at most ``MAX_JSON_BYTES`` bytes, keys always present)::

        {"v": 1,                              format version
         "label": "billing",                  the predicted label (also when unsure)
         "confidence": 0.9312,                its calibrated probability (rounded to 4 places)
         "top": [["billing", 0.9312], ["refunds", 0.05], ["login", 0.0188]],
                                              the 3 most probable labels, most probable first
         "threshold": 0.6, "unsure": false,   below the threshold the message went to the unsure folder
         "version": "20250101-120000",        the model version that decided
         "part": "ensemble",                  model | baseline | ensemble | remote | unknown
         "weight": 0.5,                       the model's share in the ensemble; null otherwise
         "tfidf": null, or                    no TF-IDF part in this version (or no runner-up)
                 {"role": "part",             "part": the TF-IDF baseline decided (alone or in the
                                              ensemble); "view": the model alone decided, these are
                                              the words the version's baseline weighs, for insight
                  "versus": "refunds",        the runner-up the words are weighed against
                  "gap": 3.2101,              TF-IDF score(label) - score(versus), before temperature
                  "bias": -0.1203,            the intercepts' share of the gap
                  "toward": [["invoice", "word", 1.2345], [" inv", "char", 0.2]],
                  "away": [["refund", "word", -0.4101]]}}
                                              up to 8 features each: [text, "word"|"char", contribution];
                                              toward: pushed to label, largest first; away: pushed to
                                              versus, most negative first. gap = bias + sum of all
                                              contributions (only the largest are kept)
    """

    label: str
    confidence: float
    top: tuple[tuple[str, float], ...]
    threshold: float
    unsure: bool
    version: str
    part: str
    weight: float | None
    terms: Terms | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "label": _clip(self.label, _LABEL_BYTES),
            "confidence": _num(self.confidence),
            "top": [[_clip(lab, _LABEL_BYTES), _num(p)] for lab, p in self.top[:TOP_LABELS]],
            "threshold": _num(self.threshold),
            "unsure": bool(self.unsure),
            "version": _clip(self.version, _VERSION_BYTES),
            "part": self.part,
            "weight": None if self.weight is None else _num(self.weight),
            "tfidf": None if self.terms is None else {
                "role": self.terms.role,
                "versus": _clip(self.terms.versus, _LABEL_BYTES),
                "gap": _num(self.terms.gap),
                "bias": _num(self.terms.bias),
                "toward": [[_clip(t.text, _TERM_BYTES), t.kind, _num(t.weight)] for t in self.terms.toward[:TOP_TERMS]],
                "away": [[_clip(t.text, _TERM_BYTES), t.kind, _num(t.weight)] for t in self.terms.away[:TOP_TERMS]],
            },
        }

    def to_json(self) -> str:
        """Compact JSON of ``to_dict``, never over ``MAX_JSON_BYTES`` (the per-string clips make it
        so; the term lists are shortened should a future field not fit)."""
        data = self.to_dict()
        text = _dumps(data)
        while len(text.encode("utf-8")) > MAX_JSON_BYTES and data["tfidf"] and (
                data["tfidf"]["toward"] or data["tfidf"]["away"]):
            longer = "toward" if len(data["tfidf"]["toward"]) >= len(data["tfidf"]["away"]) else "away"
            data["tfidf"][longer].pop()
            text = _dumps(data)
        return text

    @classmethod
    def from_json(cls, text: str) -> Explanation:
        """Read back what ``to_json`` wrote (a number stored as null, from NaN, reads as NaN); raises
        ValueError on anything else."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
                raise ValueError(f"format {data.get('v') if isinstance(data, dict) else None!r}")
            tfidf = data["tfidf"]
            terms = None
            if tfidf is not None:
                terms = Terms(
                    role=str(tfidf["role"]), versus=str(tfidf["versus"]), gap=_float(tfidf["gap"]),
                    bias=_float(tfidf["bias"]),
                    toward=tuple(Term(str(t), str(k), _float(w)) for t, k, w in tfidf["toward"]),
                    away=tuple(Term(str(t), str(k), _float(w)) for t, k, w in tfidf["away"]),
                )
            return cls(
                label=str(data["label"]), confidence=_float(data["confidence"]),
                top=tuple((str(lab), _float(p)) for lab, p in data["top"]),
                threshold=_float(data["threshold"]), unsure=bool(data["unsure"]), version=str(data["version"]),
                part=str(data["part"]), weight=None if data["weight"] is None else _float(data["weight"]), terms=terms,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a mailtriage explanation (format {FORMAT_VERSION}): {exc}: {text[:80]!r}") from exc


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _num(x: float) -> float | None:
    # JSON has no NaN or infinity; a broken confidence is stored as null rather than as invalid JSON.
    return round(float(x), 4) if math.isfinite(x) else None


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _clip(text: str, budget: int) -> str:
    """``text`` cut so that its JSON string literal takes at most ``budget`` UTF-8 bytes (escapes
    counted), marked with a trailing ``…`` when cut."""
    if len(json.dumps(text, ensure_ascii=False).encode("utf-8")) <= budget:
        return text
    out = text[: budget]
    while out and len(json.dumps(out + "…", ensure_ascii=False).encode("utf-8")) > budget:
        out = out[:-1]
    return out + "…"


def top_labels(scores: Mapping[str, float], n: int = TOP_LABELS) -> tuple[tuple[str, float], ...]:
    """The ``n`` most probable labels, most probable first (ties: the configured order)."""
    order = sorted(enumerate(scores.items()), key=lambda item: (-_sortable(item[1][1]), item[0]))
    return tuple((label, float(p)) for _, (label, p) in order[:n])


def _sortable(p: float) -> float:
    return p if math.isfinite(p) else -math.inf


def runner_up(scores: Mapping[str, float], label: str) -> str | None:
    """The most probable label other than ``label`` (None with a single label)."""
    others = [lab for lab, _ in top_labels(scores, len(scores)) if lab != label]
    return others[0] if others else None


def explain(evidence: Evidence | None, label: str, confidence: float, scores: Mapping[str, float],
            threshold: float, unsure: bool, version: str) -> Explanation:
    """The explanation of one routed prediction (``pipeline.route`` calls this for every message)."""
    evidence = evidence or Evidence(PART_UNKNOWN)
    return Explanation(
        label=label, confidence=confidence, top=top_labels(scores), threshold=threshold, unsure=unsure,
        version=version, part=evidence.part, weight=evidence.weight, terms=evidence.terms,
    )


# ---- renderings -------------------------------------------------------------------------------------

_PART_TEXT = {
    PART_MODEL: "the fine-tuned model alone",
    PART_BASELINE: "the TF-IDF baseline alone",
    PART_ENSEMBLE: "the ensemble of the fine-tuned model and the TF-IDF baseline",
    PART_REMOTE: "an external inference server",
    PART_UNKNOWN: "a classifier that gives no details",
}


def show_term(term: Term) -> str:
    """A term as a reader sees it: a word as is, a char n-gram quoted so its spaces show."""
    return term.text if term.kind == KIND_WORD else json.dumps(term.text, ensure_ascii=False)


def render(explanation: Explanation) -> list[str]:
    """The explanation as plain text lines (``mailtriage explain``, and the console's detail view)."""
    e = explanation
    lines = []
    verdict = "unsure" if e.unsure else "filed"
    relation = "below" if e.unsure else "at or above"
    lines.append(f"{verdict}: {e.label} at {_pct(e.confidence)}, {relation} the threshold {_pct(e.threshold)}"
                 + (" (went to the unsure folder)" if e.unsure else ""))
    lines.append("top labels: " + ", ".join(f"{lab} {_pct(p)}" for lab, p in e.top))
    decided = _PART_TEXT.get(e.part, e.part)
    if e.part == PART_ENSEMBLE and e.weight is not None:
        decided += f" (model weight {e.weight:.2f}, baseline {1 - e.weight:.2f})"
    lines.append(f"decided by: {decided}, model version {e.version}")
    t = e.terms
    if t is None:
        lines.append("words: none (" + ("this version has no TF-IDF baseline" if e.part == PART_MODEL
                                         else "this classifier gives no word weights") + ")")
        return lines
    if t.role == ROLE_VIEW:
        lines.append("TF-IDF view (the baseline did not decide; the words it weighs, for insight):")
    else:
        lines.append("TF-IDF part:")
    lines.append(f"  {e.label} over {t.versus} by {t.gap:+.3f} (intercepts {t.bias:+.3f}, the rest from the words)")
    lines.append(f"  toward {e.label}: " + (", ".join(f"{show_term(x)} {x.weight:+.3f}" for x in t.toward) or "none"))
    lines.append(f"  toward {t.versus}: " + (", ".join(f"{show_term(x)} {x.weight:+.3f}" for x in t.away) or "none"))
    return lines


def _pct(p: float) -> str:
    return f"{p * 100:.1f}%" if math.isfinite(p) else "n/a"


def why_header(explanation: Explanation) -> str:
    """A one-line summary for ``X-Mailtriage-Why``: ASCII only, at most ``_WHY_MAX`` characters,
    folded (CRLF + space) below 78 columns. Labels, the version and the words pass ``safe_atom``:
    nothing from the mail (the words are learned from mail) can add a line or a field."""
    from mailtriage.core.tagging import safe_atom

    e = explanation
    parts = [
        f"{'unsure' if e.unsure else 'filed'}={safe_atom(e.label)[:40]}",
        f"p={_num(e.confidence) if math.isfinite(e.confidence) else 'nan'}",
        f"threshold={_num(e.threshold)}",
        f"by={safe_atom(e.part)}" + (f"/w={e.weight:.2f}" if e.part == PART_ENSEMBLE and e.weight is not None else ""),
        f"model={safe_atom(e.version)[:40]}",
    ]
    if len(e.top) > 1:
        parts.append(f"next={safe_atom(e.top[1][0])[:40]}")
    if e.terms is not None:
        # Whole words read best on one line; char n-grams only when no word feature pushed.
        pushed = [t for t in e.terms.toward if t.kind == KIND_WORD] or list(e.terms.toward)
        words = [w for w in (safe_atom(t.text.strip())[:20] for t in pushed[:3]) if w.strip("_")]
        if words:
            parts.append(("tfidf-view" if e.terms.role == ROLE_VIEW else "words") + "=" + ",".join(words))
    value = ""
    for part in parts:
        if len(value) + 1 + len(part) > _WHY_MAX:
            break
        value = f"{value} {part}" if value else part
    return fold(value, len("X-Mailtriage-Why: "))


def fold(value: str, first: int = 0, eol: str = "\r\n") -> str:
    """``value`` folded at spaces (``eol`` + one space) so that no line passes ``_FOLD_AT`` columns
    unless one word does; ``first`` columns of the first line are taken by the field name."""
    lines: list[str] = []
    line, width = "", first
    for word in value.split(" "):
        if not word:
            continue
        if line and width + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line, width = word, 1 + len(word)
        elif line:
            line, width = f"{line} {word}", width + 1 + len(word)
        else:
            line, width = word, width + len(word)
    lines.append(line)
    return (eol + " ").join(lines)

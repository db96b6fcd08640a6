"""A Classifier that asks an external inference server instead of running the model here.

For sites that already run an inference engine (one GPU box serving several daemons), selected with
``[model] backend = "http"``. No torch: only the standard library's urllib and json.

Two wire formats, both for a sequence-classification model:

- ``api = "tei"``: Hugging Face Text Embeddings Inference, ``POST {url}/predict`` with
  ``{"inputs": [["text 1"], ["text 2"]], "truncate": true}``; the answer is one list per text of
  ``{"label": ..., "score": ...}`` with softmax scores for every label of the model.
- ``api = "vllm"``: vLLM's ``POST {url}/classify`` with ``{"model": NAME, "input": ["text 1", ...]}``;
  the answer is ``{"data": [{"index": 0, "label": ..., "probs": [...]}, ...]}``, ``probs`` in the
  model's label-id order, which for a model exported by mailtriage-train is the [categories] order.

Every call has one total deadline (``timeout``, from ``[model] timeout``: connect, send and the whole
answer, so a server trickling bytes cannot hold the inference worker), a byte cap on the answer
(``max_answer_bytes``, by default derived from the batch size) and never follows a redirect.

Failures come in two kinds. InferenceUnavailable: the server cannot answer now (refused or reset
connection, past the deadline, HTTP 5xx or 429); nothing is wrong with the message, so the watcher
leaves it for a later pass and the SMTP filter answers 451. InferenceError: an answer that is wrong
(a redirect, HTTP 4xx, a body over the cap or not the expected JSON, scores that are not a
probability distribution: out of 0..1, NaN, or not summing to 1), also 451 at the SMTP filter; the
watcher treats it like any classifier failure. A label outside the configured label set is refused
with LabelMismatchError: filing mail by a model trained on other categories would be silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mailtriage import httpcall
from mailtriage.core.classifier import Prediction
from mailtriage.core.explain import PART_REMOTE, Evidence
from mailtriage.errors import InferenceError, InferenceUnavailable, LabelMismatchError

APIS = ("tei", "vllm")
# A softmax over the labels sums to 1; servers that round each score (to 3 decimals, say) stay well inside.
SUM_TOLERANCE = 0.01
# The answer for one text is a few hundred bytes per label; this leaves room for verbose servers and
# still refuses a runaway body long before it costs memory.
ANSWER_BYTES_BASE = 1 << 20
ANSWER_BYTES_PER_TEXT = 256 << 10


def answer_cap(batch_size: int) -> int:
    """The default byte cap of one answer for ``batch_size`` texts (5 MiB for the default 16)."""
    return ANSWER_BYTES_BASE + ANSWER_BYTES_PER_TEXT * max(1, batch_size)


class HttpClassifier:
    """``Classifier`` over HTTP: ``classify(texts)`` posts them in batches of ``batch_size``."""

    def __init__(
        self,
        url: str,
        labels: Sequence[str],
        *,
        api: str = "tei",
        remote_model: str | None = None,
        timeout: float = 30.0,
        batch_size: int = 16,
        max_answer_bytes: int | None = None,
    ) -> None:
        if api not in APIS:
            raise ValueError(f"api = {api!r}: expected one of {APIS}")
        self.url = url.rstrip("/")
        self.labels = tuple(labels)
        self.api = api
        self.remote_model = remote_model
        self.timeout = timeout
        self.batch_size = batch_size
        self.max_answer_bytes = max_answer_bytes if max_answer_bytes is not None else answer_cap(batch_size)
        self.version = f"http:{remote_model}" if remote_model else f"http:{self.url}"

    def __repr__(self) -> str:
        return f"HttpClassifier(url={self.url!r}, api={self.api!r}, labels={list(self.labels)})"

    # -- the Classifier protocol ------------------------------------------------------------

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        out: list[Prediction] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            if self.api == "tei":
                out.extend(self._tei(chunk))
            else:
                out.extend(self._vllm(chunk))
        return out

    def classify_explained(self, texts: Sequence[str]) -> list[Prediction]:
        """``classify``; all that is known of how the server scored is that it did (part "remote")."""
        evidence = Evidence(PART_REMOTE)
        return [dataclasses.replace(p, evidence=evidence) for p in self.classify(texts)]

    # -- wire formats -----------------------------------------------------------------------

    def _tei(self, texts: list[str]) -> list[Prediction]:
        endpoint = f"{self.url}/predict"
        body = self._post(endpoint, {"inputs": [[t] for t in texts], "truncate": True, "raw_scores": False})
        if len(texts) == 1 and isinstance(body, list) and body and isinstance(body[0], dict):
            body = [body]  # TEI answers a one-element batch like a single input on some versions
        if not isinstance(body, list) or len(body) != len(texts):
            raise InferenceError(
                f"{endpoint} answered {_short(body)}; expected a list of {len(texts)} score lists "
                "(one per text): is it a Text Embeddings Inference server with a classification model?"
            )
        predictions = []
        for i, row in enumerate(body):
            if not isinstance(row, list) or not all(
                isinstance(s, dict) and isinstance(s.get("label"), str) and _is_number(s.get("score")) for s in row
            ):
                raise InferenceError(f"{endpoint}: result #{i} is {_short(row)}; expected [{{\"label\", \"score\"}}, ...]")
            scores = {s["label"]: float(s["score"]) for s in row}
            if len(scores) != len(row):
                raise InferenceError(f"{endpoint}: result #{i} names a label twice: {_short(row)}")
            _check_distribution(list(scores.values()), endpoint, i)
            predictions.append(self._prediction(scores, endpoint))
        return predictions

    def _vllm(self, texts: list[str]) -> list[Prediction]:
        endpoint = f"{self.url}/classify"
        payload: dict[str, Any] = {"input": texts}
        if self.remote_model:
            payload["model"] = self.remote_model
        body = self._post(endpoint, payload)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            raise InferenceError(
                f"{endpoint} answered {_short(body)}; expected {{\"data\": [...]}} with {len(texts)} results: "
                "is it vLLM serving a classification model (--task classify)?"
            )
        predictions: list[Prediction | None] = [None] * len(texts)
        for pos, item in enumerate(data):
            index = item.get("index", pos) if isinstance(item, dict) else None
            probs = item.get("probs") if isinstance(item, dict) else None
            if (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(texts)
                    or not isinstance(probs, list) or not all(_is_number(p) for p in probs)):
                raise InferenceError(f"{endpoint}: result #{pos} is {_short(item)}; expected index, label, probs")
            if len(probs) != len(self.labels):
                raise LabelMismatchError(
                    f"{endpoint} scores {len(probs)} classes but [categories] has {len(self.labels)} "
                    f"({', '.join(self.labels)}): the served model was trained on another label set; "
                    "serve the model exported for this config"
                )
            _check_distribution([float(p) for p in probs], endpoint, pos)
            scores = dict(zip(self.labels, (float(p) for p in probs), strict=True))
            pred = self._prediction(scores, endpoint)
            top = item.get("label")
            if top is not None and top != pred.label:
                raise LabelMismatchError(
                    f"{endpoint} names label {top!r} for a text whose highest score is at position of "
                    f"{pred.label!r}: the served model's label order differs from [categories]; "
                    "serve the model exported for this config"
                )
            predictions[index] = pred
        if any(p is None for p in predictions):
            raise InferenceError(f"{endpoint} answered duplicate indexes: {_short(data)}")
        return [p for p in predictions if p is not None]

    def _prediction(self, scores: Mapping[str, float], endpoint: str) -> Prediction:
        unknown = sorted(set(scores) - set(self.labels))
        if unknown:
            raise LabelMismatchError(
                f"{endpoint} answered label(s) {unknown}, which are not in [categories] "
                f"({', '.join(self.labels)}): the server serves a model trained on other categories; "
                "serve the model exported for this config, or fix [categories]"
            )
        full = {label: float(scores.get(label, 0.0)) for label in self.labels}
        best = max(self.labels, key=lambda label: full[label])
        return Prediction(label=best, confidence=full[best], scores=full)

    def _post(self, endpoint: str, payload: Mapping[str, Any]) -> Any:
        try:
            answer = httpcall.post(
                endpoint, json.dumps(payload).encode(),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                deadline_s=self.timeout, max_bytes=self.max_answer_bytes,
            )
        except httpcall.CallFailed as exc:
            if exc.kind in ("unreachable", "deadline"):
                raise InferenceUnavailable(
                    f"{exc}; is the inference server running and healthy? ([model] url = {self.url!r}, "
                    f"timeout = {self.timeout:g} s for the whole call); the message is retried later"
                ) from exc
            raise InferenceError(f"{exc}: that is not an answer of an inference server") from exc
        status = answer.status
        if 300 <= status < 400:
            raise InferenceError(
                f"{endpoint} answered HTTP {status} {answer.reason}, a redirect to "
                f"{answer.headers.get('Location', '(no Location)')!s:.200}; mailtriage never follows redirects: "
                "set [model] url to the inference server's own address"
            )
        if status != 200:
            detail = answer.body[:300].decode("utf-8", "replace").strip() or "(no body)"
            # 5xx and 429: the server is overloaded, loading or broken now; 408: it gave up waiting.
            if status >= 500 or status in (408, 429):
                raise InferenceUnavailable(
                    f"{endpoint} answered HTTP {status} {answer.reason}: {detail}; the message is retried later"
                )
            raise InferenceError(f"{endpoint} answered HTTP {status} {answer.reason}: {detail}")
        try:
            return json.loads(answer.body)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past the parser's depth
            raise InferenceError(f"{endpoint} answered non-JSON: {answer.body[:120]!r}") from exc


def _check_distribution(scores: list[float], endpoint: str, index: int) -> None:
    # A softmax answer is a probability distribution; anything else (all 1.0, raw logits, a sigmoid
    # multi-label head, NaN) would file mail at a confidence that means nothing.
    total = math.fsum(scores)
    if not all(0.0 <= s <= 1.0 for s in scores) or abs(total - 1.0) > SUM_TOLERANCE:
        raise InferenceError(
            f"{endpoint}: the scores of result #{index} are not a probability distribution "
            f"(sum {total:.4g}, range {min(scores, default=float('nan')):.4g}..{max(scores, default=float('nan')):.4g}); "
            f"expected softmax scores in 0..1 summing to 1 (within {SUM_TOLERANCE}): serve a single-label "
            "classification model with softmax (TEI: raw_scores false), such as one exported by mailtriage-train"
        )


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows any number of digits)
        return False


def _short(value: Any) -> str:
    text = json.dumps(value)[:160] if not isinstance(value, bytes) else repr(value[:160])
    return text


__all__ = ["APIS", "HttpClassifier", "answer_cap"]

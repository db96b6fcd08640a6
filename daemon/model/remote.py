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

Every failure (server down, timeout, HTTP 5xx/4xx, a body that is not the expected JSON) raises
InferenceError, which the watcher and the SMTP filter treat like any classifier failure: the message
is left untouched and retried later (IMAP) or answered 451 (SMTP). A label outside the configured
label set is refused with LabelMismatchError: filing mail by a model trained on other categories
would be silently wrong.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from mailtriage.core.classifier import Prediction
from mailtriage.errors import InferenceError, InferenceUnavailable, LabelMismatchError

APIS = ("tei", "vllm")


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
    ) -> None:
        if api not in APIS:
            raise ValueError(f"api = {api!r}: expected one of {APIS}")
        self.url = url.rstrip("/")
        self.labels = tuple(labels)
        self.api = api
        self.remote_model = remote_model
        self.timeout = timeout
        self.batch_size = batch_size
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
                isinstance(s, dict) and isinstance(s.get("label"), str) and _is_prob(s.get("score")) for s in row
            ):
                raise InferenceError(f"{endpoint}: result #{i} is {_short(row)}; expected [{{\"label\", \"score\"}}, ...]")
            predictions.append(self._prediction({s["label"]: float(s["score"]) for s in row}, endpoint))
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
            if (not isinstance(index, int) or not 0 <= index < len(texts) or not isinstance(probs, list)
                    or not all(_is_prob(p) for p in probs)):
                raise InferenceError(f"{endpoint}: result #{pos} is {_short(item)}; expected index, label, probs")
            if len(probs) != len(self.labels):
                raise LabelMismatchError(
                    f"{endpoint} scores {len(probs)} classes but [categories] has {len(self.labels)} "
                    f"({', '.join(self.labels)}): the served model was trained on another label set; "
                    "serve the model exported for this config"
                )
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
        request = urllib.request.Request(
            endpoint,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace") if exc.fp is not None else ""
            # 5xx and 429: the server's trouble, not the message's (never taken for poison).
            raise (InferenceUnavailable if exc.code >= 500 or exc.code == 429 else InferenceError)(
                f"{endpoint} answered HTTP {exc.code} {exc.reason}: {detail.strip() or '(no body)'}; "
                "the message is retried later"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout, reset
            reason = getattr(exc, "reason", exc)
            raise InferenceUnavailable(
                f"cannot reach the inference server at {endpoint}: {reason}; is it running? "
                f"([model] url = {self.url!r}); the message is retried later"
            ) from exc
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise InferenceError(f"{endpoint} answered non-JSON: {raw[:120]!r}") from exc


def _is_prob(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _short(value: Any) -> str:
    text = json.dumps(value)[:160] if not isinstance(value, bytes) else repr(value[:160])
    return text


__all__ = ["APIS", "HttpClassifier"]

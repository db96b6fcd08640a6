"""Micro-batching for the inference worker: which waiting classify requests share one forward pass,
and how that pass's result (or failure) becomes one answer per caller.

Every SMTP session and milter callback asks for one text; asked one by one, N concurrent clients
cost N forward passes in a row. Requests waiting in line are merged into one pass of up to
``[model] batch_size`` texts instead. Pure: the worker thread (``service/inference.py``) owns the
line, the lock and the clock; this module decides and splits.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailtriage.core.classifier import Prediction
from mailtriage.errors import InferenceUnavailable, ModelError

# What one classify call answers: the predictions and the version of the model that made them.
Answer = tuple[list[Prediction], str]
ClassifyPass = Callable[[list[str]], Answer]


@dataclass(eq=False)
class Request:
    """One caller's texts, its future, and when it joined the line (monotonic seconds)."""

    texts: list[str]
    arrived: float
    future: concurrent.futures.Future[Answer] = field(default_factory=concurrent.futures.Future)


def take(line: deque[object], limit: int, taken: int = 0) -> list[Request]:
    """Pop from the front of ``line`` the requests that fit, with ``taken`` texts, in a pass of ``limit``.

    A request is never split, so its predictions all come from one model version (a hot reload
    runs between passes): the first of a new pass (``taken == 0``) is taken whatever its size, and
    gathering stops at the first request that does not fit, or at anything that is not a request
    (a model load, the stop marker), which keeps its place in line. A request whose caller has
    given up (future cancelled) is dropped.
    """
    out: list[Request] = []
    while line:
        head = line[0]
        if not isinstance(head, Request):
            break
        if head.future.cancelled():
            line.popleft()
            continue
        if taken and taken + len(head.texts) > limit:
            break
        line.popleft()
        out.append(head)
        taken += len(head.texts)
    return out


def texts_in(requests: Sequence[Request]) -> int:
    return sum(len(r.texts) for r in requests)


Outcome = Answer | BaseException


def run_pass(requests: Sequence[Request], classify: ClassifyPass, answer: Callable[[Request, Outcome], None]) -> None:
    """Classify ``requests`` in one pass and ``answer`` each with its own predictions (or error).

    One bad input must fail alone: when the merged pass raises (or returns the wrong number of
    predictions), each request is classified again by itself, so each caller gets its own result
    or its own error. A server that is down or overloaded (InferenceUnavailable) fails the whole
    pass alike: no text is at fault, retrying each would only wait on the server again.
    """
    if len(requests) == 1:
        # Alone: the caller sees exactly what the classifier did (pipeline.route checks the count).
        (only,) = requests
        answer(only, _call(classify, only.texts))
        return
    texts = [t for r in requests for t in r.texts]
    outcome = _call(classify, texts)
    if isinstance(outcome, BaseException):
        if isinstance(outcome, InferenceUnavailable) or not isinstance(outcome, Exception):
            for r in requests:
                answer(r, outcome)
            return
    elif len(outcome[0]) != len(texts):
        outcome = ModelError(f"classify returned {len(outcome[0])} predictions for {len(texts)} texts")
    if isinstance(outcome, BaseException):
        for r in requests:
            answer(r, _call(classify, r.texts))
        return
    predictions, version = outcome
    start = 0
    for r in requests:
        answer(r, (predictions[start : start + len(r.texts)], version))
        start += len(r.texts)


def _call(classify: ClassifyPass, texts: list[str]) -> Outcome:
    try:
        return classify(texts)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
        return exc

"""The single inference worker: loads the model, hot-swaps it when ``current`` moves, classifies.

Every classify batch and every (re)load runs on one thread, so the GPU sees one job at a time and
a swap happens between batches, never during one. Classify requests that wait in line (SMTP
sessions, milter callbacks, mailbox watchers) are merged into one forward pass
(``service/batching.py``), so N concurrent callers do not cost N passes in a row. The thread is a
daemon thread that shutdown may abandon: a job stuck in the model or on an inference server must
never keep the service from stopping (its message stays where it is and is classified at the next
start). How long the job in progress has run is what the systemd watchdog looks at (``stall``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mailtriage.config import Config
from mailtriage.core.classifier import Classifier, Prediction, classify_explained
from mailtriage.core.pipeline import ClassifyFn
from mailtriage.errors import InferenceUnavailable
from mailtriage.model import backend as model_backend
from mailtriage import metrics
from mailtriage.service import batching
from mailtriage.service.batching import Request

log = structlog.get_logger(__name__)

__all__ = ["ClassifyFn", "Inference", "ModelLoader"]

ModelLoader = Callable[[Path], Classifier]

# How long one batch (or one model load) may take before the worker counts as stuck. An HTTP call
# cannot outlast its deadline ([model] timeout), so a little slack past it; a local batch or load
# has no deadline of its own: a batch takes seconds even on a slow CPU, a cold load of a 3B model
# from a slow disk minutes.
HTTP_SLACK_S = 15.0
LOCAL_BATCH_S = 300.0
LOCAL_LOAD_S = 900.0
# How long shutdown lets the job in progress finish before abandoning it; under the SMTP filter's
# 10 s close grace, so a sender waiting on that job hears 451 rather than a dropped connection.
SHUTDOWN_GRACE_S = 5.0


@dataclass
class _Job:
    what: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    allowed_s: float
    future: concurrent.futures.Future[Any]


@dataclass
class _Running:
    """What the worker is doing now: for the watchdog (what, allowance) and for shutdown (who waits on it)."""

    what: str
    allowed_s: float
    futures: list[concurrent.futures.Future[Any]]


@dataclass(frozen=True)
class Stall:
    """The job in progress has run longer than it may: ``what`` it is, how long, and its allowance."""

    what: str
    busy_s: float
    allowed_s: float


def _settle(future: concurrent.futures.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    # The future may already have been failed by a shutdown that gave up on this job.
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _stopping() -> InferenceUnavailable:
    return InferenceUnavailable(
        "the service is stopping: nothing more is classified; the message stays where it is and is "
        "classified at the next start"
    )


class Inference:
    """The model and the one thread that runs it.

    ``load_model`` is a seam for tests; the default is ``mailtriage.model.backend.load`` (the local model, or an HTTP inference server)
    with the ``[model]`` settings. ``on_swap`` is called on the event loop after a hot reload.
    """

    def __init__(
        self,
        config: Config,
        *,
        load_model: ModelLoader | None = None,
        on_swap: Callable[[], None] | None = None,
        stuck_after: float | None = None,
    ) -> None:
        self.config = config
        self._load_model = load_model or self._default_loader
        self._on_swap = on_swap
        # ``stuck_after``: one batch's (and one load's) allowance, for tests; by default from the backend.
        if stuck_after is not None:
            self._batch_allowance = self._load_allowance = stuck_after
        elif config.model.backend == "http":
            self._batch_allowance = self._load_allowance = config.model.timeout + HTTP_SLACK_S
        else:
            self._batch_allowance, self._load_allowance = LOCAL_BATCH_S, LOCAL_LOAD_S
        # The line: classify requests, model loads and the stop marker (None), in arrival order.
        self._line: deque[Request | _Job | None] = deque()
        self._guard = threading.Lock()
        self._arrived = threading.Condition(self._guard)
        self._batch_wait = config.model.batch_wait_ms / 1000
        self._thread: threading.Thread | None = None
        self._closed = False
        self._current: _Running | None = None
        self._current_since = 0.0
        self._classifier: Classifier | None = None
        self._model_path: Path | None = None    # the version directory now serving
        self._refused: Path | None = None       # last version refused, not retried until `current` moves
        self._reload_error: str | None = None
        self._reload_lock = asyncio.Lock()

    def _default_loader(self, path: Path) -> Classifier:
        from mailtriage.model import backend  # local: torch is imported in there, on the inference thread

        return backend.load(self.config, path)

    @property
    def waiting(self) -> int:
        """Classify requests in line, not yet in a pass (how far behind the worker is)."""
        with self._guard:
            return sum(1 for item in self._line if isinstance(item, Request))

    @property
    def model_version(self) -> str | None:
        return self._classifier.version if self._classifier is not None else None

    def _swap_model(self, path: Path) -> str:
        # Runs on the inference thread, between batches: nothing is classifying while we swap.
        started = time.monotonic()
        classifier = self._load_model(path)
        old, self._classifier, self._model_path = self._classifier, classifier, path
        metrics.set_model_version(classifier.version)
        log.info(
            "model_loaded",
            version=classifier.version,
            path=str(path),
            previous=old.version if old is not None else None,
            seconds=round(time.monotonic() - started, 2),
        )
        del old  # the last reference: its memory (and GPU memory) is freed before the next batch
        return classifier.version

    # -- the worker thread ------------------------------------------------------------------

    def _enqueue(self, item: Request | _Job) -> None:
        with self._guard:
            if self._closed:
                raise _stopping()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
                self._thread.start()
            self._line.append(item)
            self._arrived.notify()

    def _submit(
        self, what: str, allowed_s: float, fn: Callable[..., Any], *args: Any
    ) -> concurrent.futures.Future[Any]:
        job = _Job(what, fn, args, allowed_s, concurrent.futures.Future())
        self._enqueue(job)
        return job.future

    def _next(self) -> _Job | list[Request] | None:
        """The next thing to do: a job, the classify requests of one pass, or None (stop)."""
        limit = max(1, self.config.model.batch_size)
        with self._arrived:
            while not self._line:
                self._arrived.wait()
            head = self._line[0]
            if not isinstance(head, Request):
                return self._line.popleft()
            batch = batching.take(self._line, limit)
            if not batch:
                return []  # every request at the front had been given up by its caller
            # Requests that arrived while the worker was busy are all in `batch` already; a pass
            # that is not full waits a few ms more for the others of a burst, counted from when its
            # first request arrived, so a caller never waits longer than batch_wait for the pass.
            deadline = batch[0].arrived + self._batch_wait
            while (taken := batching.texts_in(batch)) < limit and not self._closed:
                now = time.monotonic()
                if now >= deadline or (self._line and not isinstance(self._line[0], Request)):
                    break  # a load or the stop waits behind this pass: do not hold it up
                if not self._line:
                    self._arrived.wait(deadline - now)
                    continue
                more = batching.take(self._line, limit, taken)
                if not more:
                    break  # the next request does not fit: it starts the next pass
                batch += more
            if not self._closed:
                return batch
        for request in batch:  # gathered, never started: answered like the rest of the line at shutdown
            if request.future.set_running_or_notify_cancel():
                _settle(request.future, error=_stopping())
        return []

    def _work(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            if isinstance(item, list):
                self._run_classify(item)
                del item  # drop the texts and the results now, not when the next request arrives
                continue
            job = item
            del item
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller gave up waiting
            self._running(job.what, job.allowed_s, [job.future])
            try:
                result = job.fn(*job.args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                _settle(job.future, error=exc)
            else:
                _settle(job.future, result)
            finally:
                self._running(None)
                del job

    def _running(self, what: str | None, allowed_s: float = 0.0,
                 futures: list[concurrent.futures.Future[Any]] | None = None) -> None:
        with self._guard:
            if what is None:
                self._current = None
            else:
                self._current = _Running(what, allowed_s, futures or [])
                self._current_since = time.monotonic()

    def _run_classify(self, requests: list[Request]) -> None:
        # A caller that gave up (an SMTP session that ended) is not classified.
        requests = [r for r in requests if r.future.set_running_or_notify_cancel()]
        if not requests:
            return
        futures: list[concurrent.futures.Future[Any]] = [r.future for r in requests]
        batch_size = max(1, self.config.model.batch_size)

        merged = [len(requests) > 1]

        def one_pass(texts: list[str]) -> tuple[list[Prediction], str]:
            # Each pass (the merged one, then each retry alone) is its own job for the watchdog.
            what = f"classify {len(texts)} text(s)" + (f" of {len(requests)} callers" if merged[0] else "")
            merged[0] = False
            self._running(what, self._batch_allowance * max(1, math.ceil(len(texts) / batch_size)), futures)
            try:
                return self._classify_now(texts)
            finally:
                self._running(None)

        def answer(request: Request, outcome: batching.Outcome) -> None:
            if isinstance(outcome, BaseException):
                _settle(request.future, error=outcome)
            else:
                _settle(request.future, outcome)

        metrics.CLASSIFY_CALLERS.observe(len(requests))
        batching.run_pass(requests, one_pass, answer)

    def stall(self, now: float | None = None) -> Stall | None:
        """The job in progress when it has run past its allowance (the watchdog stops pinging), else None."""
        with self._guard:
            running, since = self._current, self._current_since
        if running is None:
            return None
        busy = (time.monotonic() if now is None else now) - since
        return Stall(running.what, busy, running.allowed_s) if busy > running.allowed_s else None

    async def load(self) -> str:
        """Load the version ``current`` points at (start-up); raises ModelError / LabelMismatchError."""
        path = await asyncio.to_thread(model_backend.target, self.config)
        return await asyncio.wrap_future(self._submit("model load", self._load_allowance, self._swap_model, path))

    def _classify_now(self, texts: list[str]) -> tuple[list[Prediction], str]:
        classifier = self._classifier
        assert classifier is not None, "classify called before the model was loaded"
        with metrics.CLASSIFY_LATENCY.time():
            # With evidence: every decision is stored with its explanation (core.explain).
            predictions = classify_explained(classifier, texts)
        return predictions, classifier.version

    def _classify_job(self, texts: Sequence[str]) -> concurrent.futures.Future[tuple[list[Prediction], str]]:
        request = Request(list(texts), time.monotonic())
        self._enqueue(request)
        return request.future

    def classify(self, texts: Sequence[str]) -> tuple[list[Prediction], str]:
        """Classify on the inference thread and wait; safe to call from any watcher thread.

        Returns the predictions and the version of the model that made them. Raises
        InferenceUnavailable once the service is stopping.
        """
        return self._classify_job(texts).result()

    async def classify_async(self, texts: Sequence[str]) -> tuple[list[Prediction], str]:
        """``classify`` for code on the event loop (the SMTP filter): awaits the inference thread."""
        return await asyncio.wrap_future(self._classify_job(texts))

    async def check_reload(self) -> bool:
        """Load the version ``current`` points at if it changed; keep the old model on failure.

        Returns True when a new model is now serving.
        """
        try:
            target = await asyncio.to_thread(model_backend.target, self.config)
        except Exception as exc:  # noqa: BLE001 - a broken link mid-switch: keep serving the old model
            if str(exc) != self._reload_error:
                self._reload_error = str(exc)
                log.error("model_reload_check_failed", error=str(exc), serving=self.model_version)
            return False
        self._reload_error = None
        if target == self._model_path or target == self._refused:
            return False
        async with self._reload_lock:
            if target == self._model_path:
                return False
            log.info("model_reload_started", path=str(target), serving=self.model_version)
            try:
                await asyncio.wrap_future(self._submit("model reload", self._load_allowance, self._swap_model, target))
            except Exception as exc:  # noqa: BLE001 - a bad adapter must never take the service down
                self._refused = target
                metrics.MODEL_RELOADS.labels(result="refused").inc()
                log.error(
                    "model_reload_refused",
                    path=str(target),
                    error=str(exc),
                    error_type=type(exc).__name__,
                    serving=self.model_version,
                    hint="fix or retrain the model and promote it again; the old model keeps serving",
                )
                return False
            self._refused = None
            metrics.MODEL_RELOADS.labels(result="ok").inc()
            if self._on_swap is not None:
                self._on_swap()
            return True

    async def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Take no more work, fail queued jobs, give the job in progress ``grace`` seconds, then abandon it.

        Every caller still waiting gets InferenceUnavailable: its message is left for the next start.
        """
        stopping = _stopping()
        with self._guard:
            self._closed = True
            thread = self._thread
            queued = [item for item in self._line if item is not None]
            self._line.clear()
            self._line.append(None)
            self._arrived.notify()
        for item in queued:
            if item.future.set_running_or_notify_cancel():
                _settle(item.future, error=stopping)
        if thread is None:
            return
        await asyncio.to_thread(thread.join, grace)
        if not thread.is_alive():
            return
        with self._guard:
            running, since = self._current, self._current_since
        log.warning(
            "inference_worker_abandoned",
            job=running.what if running is not None else None,
            busy_s=round(time.monotonic() - since, 1) if running is not None else None,
            waited_s=grace,
            hint="the job did not finish in time; its messages stay where they are and are classified at the next start",
        )
        if running is not None:
            for future in running.futures:  # every caller of the pass in progress
                _settle(future, error=stopping)

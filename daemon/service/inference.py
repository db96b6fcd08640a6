"""The single inference worker: loads the model, hot-swaps it when ``current`` moves, classifies.

Every classify batch and every (re)load runs on one thread, so the GPU sees one job at a time and
a swap happens between batches, never during one. The thread is a daemon thread that shutdown may
abandon: a job stuck in the model or on an inference server must never keep the service from
stopping (its message stays where it is and is classified at the next start). How long the job in
progress has run is what the systemd watchdog looks at (``stall``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import threading
import time
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
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._current: _Job | None = None
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

    def _submit(
        self, what: str, allowed_s: float, fn: Callable[..., Any], *args: Any
    ) -> concurrent.futures.Future[Any]:
        job = _Job(what, fn, args, allowed_s, concurrent.futures.Future())
        with self._guard:
            if self._closed:
                raise InferenceUnavailable(
                    "the service is stopping: nothing more is classified; the message stays where it is "
                    "and is classified at the next start"
                )
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
                self._thread.start()
            self._jobs.put(job)
        return job.future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller gave up waiting (e.g. an SMTP session that ended)
            with self._guard:
                self._current, self._current_since = job, time.monotonic()
            try:
                result = job.fn(*job.args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                _settle(job.future, error=exc)
            else:
                _settle(job.future, result)
            finally:
                with self._guard:
                    self._current = None
                del job  # drop the texts and the result now, not when the next job arrives

    def stall(self, now: float | None = None) -> Stall | None:
        """The job in progress when it has run past its allowance (the watchdog stops pinging), else None."""
        with self._guard:
            job, since = self._current, self._current_since
        if job is None:
            return None
        busy = (time.monotonic() if now is None else now) - since
        return Stall(job.what, busy, job.allowed_s) if busy > job.allowed_s else None

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
        batches = max(1, math.ceil(len(texts) / max(1, self.config.model.batch_size)))
        return self._submit(f"classify {len(texts)} text(s)", self._batch_allowance * batches,
                            self._classify_now, list(texts))

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
        stopping = InferenceUnavailable(
            "the service is stopping: nothing more is classified; the message stays where it is and is "
            "classified at the next start"
        )
        with self._guard:
            self._closed = True
            thread = self._thread
            queued: list[_Job] = []
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    queued.append(job)
            self._jobs.put(None)
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                _settle(job.future, error=stopping)
        if thread is None:
            return
        await asyncio.to_thread(thread.join, grace)
        if not thread.is_alive():
            return
        with self._guard:
            job, since = self._current, self._current_since
        log.warning(
            "inference_worker_abandoned",
            job=job.what if job is not None else None,
            busy_s=round(time.monotonic() - since, 1) if job is not None else None,
            waited_s=grace,
            hint="the job did not finish in time; its messages stay where they are and are classified at the next start",
        )
        if job is not None:
            _settle(job.future, error=stopping)

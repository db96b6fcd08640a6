"""The single inference worker: loads the model, hot-swaps it when ``current`` moves, classifies.

Every classify batch and every (re)load runs on one thread, so the GPU sees one job at a time and
a swap happens between batches, never during one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from mailtriage.config import Config
from mailtriage.core.classifier import Classifier, Prediction
from mailtriage.core.pipeline import ClassifyFn
from mailtriage.model import backend as model_backend
from mailtriage import metrics

log = structlog.get_logger(__name__)

__all__ = ["ClassifyFn", "Inference", "ModelLoader"]

ModelLoader = Callable[[Path], Classifier]


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
    ) -> None:
        self.config = config
        self._load_model = load_model or self._default_loader
        self._on_swap = on_swap
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
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

    async def load(self) -> str:
        """Load the version ``current`` points at (start-up); raises ModelError / LabelMismatchError."""
        path = await asyncio.to_thread(model_backend.target, self.config)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._swap_model, path)

    def _classify_now(self, texts: list[str]) -> tuple[list[Prediction], str]:
        classifier = self._classifier
        assert classifier is not None, "classify called before the model was loaded"
        with metrics.CLASSIFY_LATENCY.time():
            predictions = classifier.classify(texts)
        return predictions, classifier.version

    def classify(self, texts: Sequence[str]) -> tuple[list[Prediction], str]:
        """Classify on the inference thread and wait; safe to call from any watcher thread.

        Returns the predictions and the version of the model that made them.
        """
        return self._executor.submit(self._classify_now, list(texts)).result()

    async def classify_async(self, texts: Sequence[str]) -> tuple[list[Prediction], str]:
        """``classify`` for code on the event loop (the SMTP filter): awaits the inference thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._classify_now, list(texts))

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
            loop = asyncio.get_running_loop()
            log.info("model_reload_started", path=str(target), serving=self.model_version)
            try:
                await loop.run_in_executor(self._executor, self._swap_model, target)
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

    async def shutdown(self) -> None:
        """Finish the batch in progress, drop queued ones, stop the thread."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

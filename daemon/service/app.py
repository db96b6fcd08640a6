"""`mailtriage serve`: the long-running daemon around the IMAP watchers, on one asyncio event loop.

Threads and what they own:
- one worker thread per watched (account, mailbox): a blocking ``MailboxWatcher`` with its own
  IMAP connection (imapclient is not thread-safe);
- one inference thread (a single-worker executor): every classify batch and every model (re)load
  runs there, so the GPU sees one job at a time and a hot reload swaps the model between batches;
- the event loop: APScheduler (retrain subprocess, correction scan, hot-reload check), systemd
  notifications, signal handling and, with ``[smtp] enabled``, the SMTP content filter
  (``mailtriage.smtp.relay``, started as an ``on_start`` hook).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from mailtriage.service import metrics

from mailtriage.model import modeldir

from mailtriage.service import sdnotify
from mailtriage.core.classifier import Classifier, Prediction
from mailtriage.config import AccountConfig, Config
from mailtriage.errors import ConfigError

log = structlog.get_logger(__name__)

ClassifyFn = Callable[[Sequence[str]], tuple[list[Prediction], str]]
ModelLoader = Callable[[Path], Classifier]


class Watcher(Protocol):
    def run(self, stop: threading.Event) -> None: ...


WatcherFactory = Callable[[AccountConfig, str, Config, Any, ClassifyFn], Watcher]
# Something else that lives on the loop (e.g. the SMTP content filter): started once the model is
# loaded, given the service (``await service.classify_async(texts)``); returns an async closer or None.
StartHook = Callable[["Service"], Awaitable[Callable[[], Awaitable[None]] | None]]

# The retrain runs the trainer's main() in a fresh interpreter: same venv as the daemon, no reliance
# on the console script being on PATH, and training memory never lives in this process.
_TRAIN_BOOTSTRAP = "import sys; from mailtriage_trainer.cli import main; sys.exit(main())"
_RETRAIN_TERM_GRACE_S = 10.0
_LINE_SPLIT = re.compile(rb"[\r\n]+")  # tqdm redraws with \r: each redraw is a line in the log


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_weekdays(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday) as an explicit list of day names.

    APScheduler 3.x numbers weekdays from Monday = 0 even in ``from_crontab`` (agronholm/apscheduler
    #286, fixed only in 4.x), so "0 3 * * 0" would run on Monday. Names mean the same in both.
    """
    days: set[int] = set()
    for part in field.lower().split(","):
        rng, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if rng == "*":
            lo, hi = 0, 6
        else:
            ends = [int(x) if x.isdigit() else _CRON_DAYS.index(x[:3]) for x in rng.split("-")]
            lo, hi = (ends[0], ends[0] if not step_text else 6) if len(ends) == 1 else (ends[0], ends[1])
            if not (0 <= lo <= 7 and 0 <= hi <= 7) or len(ends) > 2:
                raise ValueError(f"day of week {part!r} is outside 0-7")
        days.update(d % 7 for d in range(lo, hi + 1, step))
    if days == set(range(7)):
        return "*"
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def crontab_trigger(expr: str) -> Any:
    """A CronTrigger for a standard 5-field crontab line, with crontab's weekday numbering."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(fields)}")
    minute, hour, day, month, weekday = fields
    try:
        weekday = _cron_weekdays(weekday)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"bad day-of-week field {fields[4]!r}: {exc}") from exc
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=weekday)


def _default_hooks(config: Config) -> list[StartHook]:
    if not config.smtp.enabled:
        return []
    from mailtriage.smtp.relay import start_smtp_filter  # aiosmtpd is only imported when it is used

    return [start_smtp_filter]


class Service:
    """The daemon. ``await Service(config, config_path).run()`` returns after SIGTERM/SIGINT or ``stop()``.

    The keyword arguments are seams for tests (a fake model loader or watcher); production uses
    the defaults: ``mailtriage.model.transformers.load_classifier``, ``mailtriage.imap.watcher.MailboxWatcher``,
    ``mailtriage.imap.connection.connect`` and ``mailtriage.store.state.StateDB(config.state_path)``.
    """

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        *,
        load_model: ModelLoader | None = None,
        watcher_factory: WatcherFactory | None = None,
        client_factory: Callable[[AccountConfig], Any] | None = None,
        state: Any = None,
        reload_interval: float = 5.0,
        join_timeout: float = 30.0,
        retrain_command: Sequence[str] | None = None,
        on_start: Sequence[StartHook] | None = None,
    ) -> None:
        if not config.accounts and not config.smtp.enabled:
            raise ConfigError(
                "mailtriage serve has nothing to do: the config has no [[accounts]] and [smtp] enabled = false; "
                "add an [[accounts]] table with the IMAP host, username and mailboxes to watch"
            )
        self.config = config
        self.config_path = config_path
        self._load_model = load_model or self._default_loader
        self._watcher_factory = watcher_factory
        self._client_factory = client_factory
        self._state = state
        self.reload_interval = reload_interval
        self.join_timeout = join_timeout
        self._retrain_command = list(retrain_command) if retrain_command is not None else None
        # None: what the config asks for (the SMTP content filter when [smtp] enabled); tests pass their own.
        self._on_start = list(on_start) if on_start is not None else _default_hooks(config)
        self._closers: list[Callable[[], Awaitable[None]]] = []

        self._stop = threading.Event()          # seen by the watcher threads
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inference = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._classifier: Classifier | None = None
        self._model_path: Path | None = None    # the version directory now serving
        self._refused: Path | None = None       # last version refused, not retried until `current` moves
        self._reload_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._retrain_lock = asyncio.Lock()
        self._retrain_proc: asyncio.subprocess.Process | None = None
        self._threads: list[threading.Thread] = []
        self._scheduler: Any = None
        self._key_cache: Any = None
        self._metrics_server: Any = None
        self.ready = asyncio.Event()

    # -- model ------------------------------------------------------------------------------

    def _default_loader(self, path: Path) -> Classifier:
        from mailtriage.model.transformers import load_classifier  # the only torch import, on the inference thread

        m = self.config.model
        return load_classifier(
            path,
            device=m.device,
            batch_size=m.batch_size,
            max_length=m.max_length,
            expected_labels=self.config.labels,
        )

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
        return self._inference.submit(self._classify_now, list(texts)).result()

    async def classify_async(self, texts: Sequence[str]) -> tuple[list[Prediction], str]:
        """``classify`` for code on the event loop (the SMTP filter): awaits the inference thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._inference, self._classify_now, list(texts))

    async def check_reload(self) -> bool:
        """Load the version ``current`` points at if it changed; keep the old model on failure.

        Returns True when a new model is now serving.
        """
        try:
            target = await asyncio.to_thread(modeldir.resolve, Path(self.config.model.path))
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
                await loop.run_in_executor(self._inference, self._swap_model, target)
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
            self._notify_status()
            return True

    # -- watchers ---------------------------------------------------------------------------

    def _make_watcher(self, account: AccountConfig, mailbox: str) -> Watcher:
        if self._watcher_factory is not None:
            return self._watcher_factory(account, mailbox, self.config, self._state, self.classify)
        from mailtriage.imap.watcher import MailboxWatcher

        return MailboxWatcher(account, mailbox, self.config, self._state, self.classify)

    def _run_watcher(self, account: AccountConfig, mailbox: str) -> None:
        # A watcher reconnects by itself; this loop only catches what escapes it, so one broken
        # mailbox never stops the others and never ends the service.
        backoff = 1.0
        bound = log.bind(account=account.name, mailbox=mailbox)
        while not self._stop.is_set():
            try:
                self._make_watcher(account, mailbox).run(self._stop)
                if self._stop.is_set():
                    break
                bound.warning("watcher_returned_early", restart_in=backoff)
            except Exception as exc:  # noqa: BLE001
                bound.error("watcher_crashed", error=str(exc), error_type=type(exc).__name__, restart_in=backoff, exc_info=True)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, float(account.reconnect_max))
        bound.info("watcher_stopped")

    def _start_watchers(self) -> None:
        for account in self.config.accounts:
            for mailbox in account.mailboxes:
                thread = threading.Thread(
                    target=self._run_watcher,
                    args=(account, mailbox),
                    name=f"watch-{account.name}-{mailbox}",
                    daemon=True,  # a watcher stuck in a dead socket must not block exit forever
                )
                thread.start()
                self._threads.append(thread)

    def _join_watchers(self) -> None:
        deadline = time.monotonic() + self.join_timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("watcher_did_not_stop", thread=thread.name, waited_s=self.join_timeout)

    # -- scheduled jobs ---------------------------------------------------------------------

    def _retrain_argv(self) -> list[str] | None:
        if self._retrain_command is not None:
            return self._retrain_command
        if not self.config_path:
            return None
        return [sys.executable, "-c", _TRAIN_BOOTSTRAP, "--config", str(self.config_path)]

    async def retrain(self) -> int | None:
        """Run the trainer as a subprocess, logging its output; never two at once.

        Returns its exit status, or None when skipped. A promoted model is picked up by the
        reload check right after.
        """
        argv = self._retrain_argv()
        if argv is None:
            metrics.RETRAINS.labels(result="skipped").inc()
            log.warning("retrain_skipped", reason="the service was started without a config file path")
            return None
        if self._retrain_lock.locked():
            metrics.RETRAINS.labels(result="skipped").inc()
            log.warning("retrain_skipped", reason="a retrain is still running")
            return None
        async with self._retrain_lock:
            env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
            log.info("retrain_started", argv=argv)
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env,
            )
            self._retrain_proc = proc
            try:
                assert proc.stdout is not None
                pending = b""
                while chunk := await proc.stdout.read(65536):
                    *lines, pending = _LINE_SPLIT.split(pending + chunk)
                    for line in lines:
                        if line.strip():
                            log.info("retrain_output", line=line.decode("utf-8", "replace").rstrip())
                if pending.strip():
                    log.info("retrain_output", line=pending.decode("utf-8", "replace").rstrip())
                rc = await proc.wait()
            except asyncio.CancelledError:
                await self._stop_retrain()  # never leave a training process behind
                raise
            finally:
                self._retrain_proc = None
            seconds = round(time.monotonic() - started, 1)
            if rc == 0:
                metrics.RETRAINS.labels(result="ok").inc()
                log.info("retrain_finished", returncode=rc, seconds=seconds)
            else:
                metrics.RETRAINS.labels(result="failed").inc()
                log.error("retrain_failed", returncode=rc, seconds=seconds, hint="see the retrain_output lines above")
        if rc == 0 and not self._stop.is_set():
            await self.check_reload()
        return rc

    def _job(self, func: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
        """A scheduled job whose cancellation at shutdown is expected, not an error to log."""

        async def job() -> None:
            try:
                await func()
            except asyncio.CancelledError:
                if not self._stop.is_set():
                    raise
                log.debug("job_cancelled_at_shutdown", job=getattr(func, "__name__", str(func)))

        job.__name__ = job.__qualname__ = getattr(func, "__name__", "job")
        return job

    async def _stop_retrain(self) -> None:
        proc = self._retrain_proc
        if proc is None or proc.returncode is not None:
            return
        log.info("retrain_terminating", pid=proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _RETRAIN_TERM_GRACE_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def scan_corrections(self) -> int:
        """One correction scan of every account (in a worker thread); returns how many were new."""
        from mailtriage.store.corrections import KeyCache, scan_corrections

        if self._key_cache is None:
            self._key_cache = KeyCache()
        client_factory = self._client_factory
        if client_factory is None:
            from mailtriage.imap.connection import connect

            client_factory = connect
        try:
            new = await asyncio.to_thread(scan_corrections, client_factory, self.config, self._state, self._key_cache)
        except Exception as exc:  # noqa: BLE001 - retried at the next interval
            log.error("correction_scan_failed", error=str(exc), exc_info=True)
            return 0
        log.info("correction_scan_done", new_corrections=len(new))
        return len(new)

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        scheduler = AsyncIOScheduler(event_loop=self._loop)
        common = {"max_instances": 1, "coalesce": True}
        if self.config.training.schedule:
            try:
                trigger = crontab_trigger(self.config.training.schedule)
            except ValueError as exc:
                raise ConfigError(
                    f"training.schedule = {self.config.training.schedule!r} is not a valid cron expression: {exc}"
                ) from exc
            scheduler.add_job(self._job(self.retrain), trigger, id="retrain", misfire_grace_time=3600, **common)
        scheduler.add_job(
            self._job(self.scan_corrections), "interval", seconds=self.config.correction_scan_interval,
            id="corrections", misfire_grace_time=None, **common,
        )
        scheduler.add_job(
            self._job(self.check_reload), "interval", seconds=self.reload_interval, id="reload",
            misfire_grace_time=None, **common,
        )
        scheduler.start()
        self._scheduler = scheduler
        job = scheduler.get_job("retrain")
        log.info("scheduler_started", next_retrain=str(job.next_run_time) if job else None)

    # -- systemd ----------------------------------------------------------------------------

    def _notify_status(self) -> None:
        n = sum(len(a.mailboxes) for a in self.config.accounts)
        sdnotify.notify(f"STATUS=model {self.model_version}; watching {n} mailbox(es)")

    async def _watchdog(self, interval: float) -> None:
        # Pinging from the event loop proves the loop is alive; a wedged loop gets us restarted.
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the service to shut down (signal handlers call this; so may tests)."""
        if self._loop is None or self._stopping is None:
            self._stop.set()
            return
        self._loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self, signame: str | None = None) -> None:
        if self._stopping is None or self._stopping.is_set():
            if signame:
                log.info("shutdown_already_in_progress", signal=signame)
            return
        log.info("shutdown_requested", signal=signame)
        sdnotify.notify("STOPPING=1\nSTATUS=stopping")
        self._stop.set()
        self._stopping.set()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._begin_stop, sig.name)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                # Not the main thread (e.g. embedded in a test runner thread): stop() still works.
                log.debug("signal_handler_not_installed", signal=sig.name)
        return installed

    async def run(self) -> None:
        """Load the model, start everything, wait for a stop request, then shut down cleanly.

        Raises ModelError / LabelMismatchError / ConfigError at start-up (fail fast, clear message).
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        if self._stop.is_set():
            self._stopping.set()
        signals = self._install_signal_handlers(loop)
        watchdog: asyncio.Task[None] | None = None
        try:
            sdnotify.notify("STATUS=loading model")
            path = await asyncio.to_thread(modeldir.resolve, Path(self.config.model.path))
            await loop.run_in_executor(self._inference, self._swap_model, path)
            if self._state is None:
                from mailtriage.store.state import StateDB

                self._state = StateDB(self.config.state_path)
            try:
                self._metrics_server = metrics.start_metrics_server(self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: {exc.strerror or exc}; "
                    "pick a free metrics_port (or 0 to turn metrics off)"
                ) from exc
            self._start_scheduler()
            self._start_watchers()
            for hook in self._on_start:
                closer = await hook(self)
                if closer is not None:
                    self._closers.append(closer)
            interval = sdnotify.watchdog_interval()
            if interval:
                watchdog = asyncio.create_task(self._watchdog(interval), name="watchdog")
            sdnotify.notify("READY=1")
            self._notify_status()
            self.ready.set()
            log.info(
                "service_ready",
                model=self.model_version,
                hooks=len(self._closers),
                mailboxes=[f"{a.name}:{m}" for a in self.config.accounts for m in a.mailboxes],
            )
            await self._stopping.wait()
        finally:
            self._begin_stop()  # an error at start-up stops whatever did start
            await self._shutdown(watchdog)
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _shutdown(self, watchdog: asyncio.Task[None] | None) -> None:
        self._stop.set()
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception as exc:  # noqa: BLE001 - keep shutting the rest down
                log.error("stop_hook_failed", error=str(exc))
        await self._stop_retrain()  # before the scheduler: a cancelled retrain job must not orphan its process
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        # Watchers finish or abandon their current batch; the state db makes either safe.
        await asyncio.to_thread(self._join_watchers)
        await asyncio.to_thread(self._inference.shutdown, wait=True, cancel_futures=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        close = getattr(self._state, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
        log.info("service_stopped")


def serve(config: Config, config_path: str | None) -> int:
    """Entry point of ``mailtriage serve``: run until SIGTERM/SIGINT, return the exit status (0)."""
    asyncio.run(Service(config, config_path).run())
    return 0

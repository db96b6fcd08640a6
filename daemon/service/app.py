"""`mailtriage serve`: the long-running daemon around the IMAP watchers, on one asyncio event loop.

Threads and what they own:
- one worker thread per watched (account, mailbox): a blocking ``MailboxWatcher`` with its own
  IMAP connection (imapclient is not thread-safe);
- one inference thread (``mailtriage.service.inference``): every classify batch and every model
  (re)load runs there, so the GPU sees one job at a time and a hot reload swaps between batches;
- the event loop: the scheduled jobs (``mailtriage.service.jobs``: retrain subprocess, correction
  scan, hot-reload check), systemd notifications, signal handling and, with ``[smtp] enabled``,
  the SMTP content filter (``mailtriage.smtp.relay``), with ``[milter] enabled`` the milter
  (``mailtriage.milter.server``), each started as an ``on_start`` hook.
This module is the lifecycle: start in order, watch, stop in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import structlog

from mailtriage.config import AccountConfig, Config
from mailtriage.core import backoff as core_backoff
from mailtriage.core.classifier import Prediction
from mailtriage.errors import ConfigError
from mailtriage.service import metrics_server, sdnotify
from mailtriage.service.inference import SHUTDOWN_GRACE_S, ClassifyFn, Inference, ModelLoader
from mailtriage.service.jobs import ClientFactory, Jobs

if TYPE_CHECKING:
    from mailtriage.store.state import StateDB

log = structlog.get_logger(__name__)

STALL_CHECK_S = 5.0  # how often a stuck inference worker is looked for when systemd sets no watchdog


class Watcher(Protocol):
    def run(self, stop: threading.Event) -> None: ...


WatcherFactory = Callable[[AccountConfig, str, Config, "StateDB", ClassifyFn], Watcher]
# Something else that lives on the loop (e.g. the SMTP content filter): started once the model is
# loaded, given the service (``await service.classify_async(texts)``); returns an async closer or None.
StartHook = Callable[["Service"], Awaitable[Callable[[], Awaitable[None]] | None]]


def _default_hooks(config: Config) -> list[StartHook]:
    hooks: list[StartHook] = []
    if config.smtp.enabled:
        from mailtriage.smtp.relay import start_smtp_filter  # aiosmtpd is only imported when it is used

        hooks.append(start_smtp_filter)
    if config.milter.enabled:
        from mailtriage.milter.server import start_milter

        hooks.append(start_milter)
    if config.web.enabled:
        from mailtriage.web.server import start_web  # starlette and uvicorn are only imported when used

        hooks.append(start_web)
    return hooks


class Service:
    """The daemon. ``await Service(config, config_path).run()`` returns after SIGTERM/SIGINT or ``stop()``.

    The keyword arguments are seams for tests (a fake model loader or watcher); production uses
    the defaults: ``mailtriage.model.transformers.load_classifier``, ``mailtriage.imap.watcher.MailboxWatcher``,
    ``mailtriage.imap.connection.connect`` and ``mailtriage.store.state.StateDB(config.state_path)``.
    ``inference`` (the model worker) and ``jobs`` (scheduler, retrain, correction scan) are its parts.
    """

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        *,
        load_model: ModelLoader | None = None,
        watcher_factory: WatcherFactory | None = None,
        client_factory: ClientFactory | None = None,
        state: StateDB | None = None,
        reload_interval: float = 5.0,
        join_timeout: float = 30.0,
        retrain_command: Sequence[str] | None = None,
        on_start: Sequence[StartHook] | None = None,
        inference_grace: float = SHUTDOWN_GRACE_S,
        inference_stuck_after: float | None = None,
    ) -> None:
        if not config.accounts and not config.smtp.enabled and not config.milter.enabled:
            raise ConfigError(
                "mailtriage serve has nothing to do: the config has no [[accounts]], [smtp] enabled = false and "
                "[milter] enabled = false; add an [[accounts]] table with the IMAP host, username and mailboxes "
                "to watch, or enable an intake"
            )
        self.config = config
        self.config_path = config_path
        self._watcher_factory = watcher_factory
        self._state = state
        self.join_timeout = join_timeout
        self.inference_grace = inference_grace
        # None: what the config asks for (the SMTP content filter when [smtp] enabled); tests pass their own.
        self._on_start = list(on_start) if on_start is not None else _default_hooks(config)
        self._closers: list[Callable[[], Awaitable[None]]] = []

        self._stop = threading.Event()          # seen by the watcher threads
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.inference = Inference(config, load_model=load_model, on_swap=self._notify_status,
                                   stuck_after=inference_stuck_after)
        self.jobs = Jobs(
            config, config_path, reloader=self.inference, stop=self._stop, client_factory=client_factory,
            retrain_command=retrain_command, reload_interval=reload_interval,
        )
        self.jobs.state = state
        self._threads: list[threading.Thread] = []
        self._metrics_server: metrics_server.MetricsServer | None = None
        self.ready = asyncio.Event()

    # -- what the watchers, hooks and tests call ----------------------------------------------

    @property
    def state(self) -> StateDB | None:
        """The state database, once ``run`` opened it (start hooks may record into it)."""
        return self._state

    @property
    def model_version(self) -> str | None:
        return self.inference.model_version

    def classify(self, texts: Sequence[str]) -> tuple[list[Prediction], str]:
        """Classify on the inference thread and wait; safe to call from any watcher thread."""
        return self.inference.classify(texts)

    async def classify_async(self, texts: Sequence[str]) -> tuple[list[Prediction], str]:
        """``classify`` for code on the event loop (the SMTP filter)."""
        return await self.inference.classify_async(texts)

    async def check_reload(self) -> bool:
        """Load the version ``current`` points at if it changed (see ``Inference.check_reload``)."""
        return await self.inference.check_reload()

    async def retrain(self) -> int | None:
        """Run the trainer subprocess now (see ``Jobs.retrain``)."""
        return await self.jobs.retrain()

    async def scan_corrections(self) -> int:
        """One correction scan now (see ``Jobs.scan_corrections``)."""
        return await self.jobs.scan_corrections()

    # -- watchers ---------------------------------------------------------------------------

    def _make_watcher(self, account: AccountConfig, mailbox: str) -> Watcher:
        if self._watcher_factory is not None:
            return self._watcher_factory(account, mailbox, self.config, self._state, self.classify)
        from mailtriage.imap.watcher import MailboxWatcher

        return MailboxWatcher(account, mailbox, self.config, self._state, self.classify)

    def _run_watcher(self, account: AccountConfig, mailbox: str) -> None:
        # A watcher reconnects by itself; this loop only catches what escapes it, so one broken
        # mailbox never stops the others and never ends the service.
        backoff, attempt = 1.0, 0
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
            attempt += 1
            backoff = core_backoff.delay(attempt, 1.0, float(account.reconnect_max))
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


    # -- systemd ----------------------------------------------------------------------------

    def _notify_status(self) -> None:
        n = sum(len(a.mailboxes) for a in self.config.accounts)
        sdnotify.notify(f"STATUS=model {self.model_version}; watching {n} mailbox(es)")

    async def _watchdog(self, interval: float | None) -> None:
        # Pinging from the event loop proves the loop is alive; a wedged loop gets us restarted. A
        # loop that is fine around a stuck inference worker files nothing either: no ping then, so
        # systemd restarts us after WatchdogSec (the message being classified stays unfiled, and is
        # classified after the restart). Without a systemd watchdog the stall is still logged.
        stuck = False
        while True:
            stall = self.inference.stall()
            if stall is None:
                if stuck:
                    stuck = False
                    log.info("inference_worker_recovered")
                    self._notify_status()
                if interval:
                    sdnotify.notify("WATCHDOG=1")
            elif not stuck:
                stuck = True
                log.error(
                    "inference_worker_stuck", job=stall.what, busy_s=round(stall.busy_s, 1), allowed_s=stall.allowed_s,
                    watchdog="pings stopped: systemd restarts the service after WatchdogSec" if interval else "not set",
                    hint="check the inference server ([model] url) or the model; the message stays where it is",
                )
                sdnotify.notify(f"STATUS=inference stuck for {stall.busy_s:.0f} s ({stall.what}); watchdog pings stopped")
            await asyncio.sleep(interval or STALL_CHECK_S)

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
            if not await self._unless_stopped(self.inference.load()):
                return  # stopped while loading (e.g. a hung start-up probe): the finally shuts down
            if self._state is None:
                from mailtriage.store.state import StateDB

                self._state = StateDB(self.config.state_path)
            self.jobs.state = self._state
            try:
                self._metrics_server = await metrics_server.start_metrics_server(
                    self.config.metrics_host, self.config.metrics_port
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: {exc.strerror or exc}; "
                    "pick a free metrics_port (or 0 to turn metrics off)"
                ) from exc
            self.jobs.start(loop)
            self._start_watchers()
            for hook in self._on_start:
                closer = await hook(self)
                if closer is not None:
                    self._closers.append(closer)
            watchdog = asyncio.create_task(self._watchdog(sdnotify.watchdog_interval()), name="watchdog")
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

    async def _unless_stopped(self, work: Awaitable[object]) -> bool:
        """Await ``work`` unless a stop comes first: True when it finished (its errors raise), False on stop.

        Start-up work may wait on another server; a SIGTERM meanwhile must not wait with it.
        """
        assert self._stopping is not None
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()  # the inference worker's job itself is abandoned by Inference.shutdown
        return False

    async def _shutdown(self, watchdog: asyncio.Task[None] | None) -> None:
        self._stop.set()
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        # First, and alongside the rest: the batch in progress gets inference_grace seconds, queued
        # ones fail at once. A worker stuck on a hung server is abandoned (a daemon thread), so the
        # watchers and SMTP sessions waiting on it are released instead of holding up the exit.
        inference_closed = asyncio.create_task(self.inference.shutdown(self.inference_grace), name="inference-shutdown")
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception as exc:  # noqa: BLE001 - keep shutting the rest down
                log.error("stop_hook_failed", error=str(exc))
        await self.jobs.shutdown()  # the retrain process first, then the scheduler
        # Watchers finish or abandon their current batch; the state db makes either safe.
        await asyncio.to_thread(self._join_watchers)
        await inference_closed
        if self._metrics_server is not None:
            await self._metrics_server.close()
        close = getattr(self._state, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
        log.info("service_stopped")


def serve(config: Config, config_path: str | None) -> int:
    """Entry point of ``mailtriage serve``: run until SIGTERM/SIGINT, return the exit status (0)."""
    asyncio.run(Service(config, config_path).run())
    return 0

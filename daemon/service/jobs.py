"""The daemon's scheduled jobs on the event loop: retrain subprocess, correction scan, reload check.

APScheduler 3.x ``AsyncIOScheduler`` runs them; ``crontab_trigger`` turns ``training.schedule``
into a trigger with crontab's weekday numbering.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import structlog

from mailtriage.config import AccountConfig, Config
from mailtriage.core.cron import crontab_trigger
from mailtriage.errors import ConfigError
from mailtriage.model import modeldir
from mailtriage import metrics

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from mailtriage.store.corrections import KeyCache
    from mailtriage.store.state import StateDB

log = structlog.get_logger(__name__)

ClientFactory = Callable[[AccountConfig], "IMAPClient"]

# The retrain runs the trainer's main() in a fresh interpreter: same venv as the daemon, no reliance
# on the console script being on PATH, and training memory never lives in this process.
_TRAIN_BOOTSTRAP = "import sys; from mailtriage_trainer.cli import main; sys.exit(main())"
_RETRAIN_TERM_GRACE_S = 10.0
_LINE_SPLIT = re.compile(rb"[\r\n]+")  # tqdm redraws with \r: each redraw is a line in the log


class Reloader(Protocol):
    async def check_reload(self) -> bool: ...


class Jobs:
    """The scheduler and what it runs. ``stop`` is the service's shutdown flag.

    ``state`` is set by the service once the state database is open (before ``start``).
    """

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        *,
        reloader: Reloader,
        stop: threading.Event,
        client_factory: ClientFactory | None = None,
        retrain_command: Sequence[str] | None = None,
        reload_interval: float = 5.0,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.state: StateDB | None = None
        self.reload_interval = reload_interval
        self._reloader = reloader
        self._stop = stop
        self._client_factory = client_factory
        self._retrain_command = list(retrain_command) if retrain_command is not None else None
        self._retrain_lock = asyncio.Lock()
        self._retrain_proc: asyncio.subprocess.Process | None = None
        self._key_cache: KeyCache | None = None
        self.scheduler: AsyncIOScheduler | None = None

    # -- retrain ----------------------------------------------------------------------------

    def retrain_argv(self) -> list[str] | None:
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
        argv = self.retrain_argv()
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
                await self.stop_retrain()  # never leave a training process behind
                raise
            finally:
                self._retrain_proc = None
            seconds = round(time.monotonic() - started, 1)
            if rc == 0:
                metrics.RETRAINS.labels(result="ok").inc()
                log.info("retrain_finished", returncode=rc, seconds=seconds)
            elif rc == modeldir.EXIT_BUSY:
                metrics.RETRAINS.labels(result="busy").inc()
                log.warning("retrain_skipped", returncode=rc, reason="another mailtriage-train (the systemd "
                            "timer's, or a promote) holds the model directory lock")
            else:
                metrics.RETRAINS.labels(result="failed").inc()
                log.error("retrain_failed", returncode=rc, seconds=seconds, hint="see the retrain_output lines above")
        if rc == 0 and not self._stop.is_set():
            await self._reloader.check_reload()
        return rc

    async def stop_retrain(self) -> None:
        """Terminate a running retrain (SIGTERM, then SIGKILL after a grace period)."""
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

    # -- corrections ------------------------------------------------------------------------

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
            new = await asyncio.to_thread(scan_corrections, client_factory, self.config, self.state, self._key_cache)
        except Exception as exc:  # noqa: BLE001 - retried at the next interval
            log.error("correction_scan_failed", error=str(exc), exc_info=True)
            return 0
        log.info("correction_scan_done", new_corrections=len(new))
        return len(new)

    # -- scheduler --------------------------------------------------------------------------

    def _job(self, func: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
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

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the scheduler on ``loop``; raises ConfigError for a bad ``training.schedule``."""
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler(event_loop=loop)
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
            self._job(self._reloader.check_reload), "interval", seconds=self.reload_interval, id="reload",
            misfire_grace_time=None, **common,
        )
        scheduler.start()
        self.scheduler = scheduler
        job = scheduler.get_job("retrain")
        log.info("scheduler_started", next_retrain=str(job.next_run_time) if job else None)

    async def shutdown(self) -> None:
        """Stop a running retrain first (a cancelled retrain job must not orphan its process), then the scheduler."""
        await self.stop_retrain()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)

"""Waiting on a condition with a deadline, for tests and harnesses.

Something that happens on another thread, process or server (a message filed, a log line, a socket
closed) is waited for by polling the thing itself until a deadline; a fixed sleep would either
waste time or, on a loaded machine, be too short.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

DEFAULT_TIMEOUT_S = 15.0
DEFAULT_INTERVAL_S = 0.05


class _Deadline:
    """One wait: ``outcome()`` is True once the condition holds, False (or an AssertionError naming
    ``what``) once the deadline has passed, None while there is time left."""

    def __init__(self, condition: Callable[[], object], timeout: float, what: str | None) -> None:
        self.condition = condition
        self.timeout = timeout
        self.what = what
        self.end = time.monotonic() + timeout

    def outcome(self) -> bool | None:
        if self.condition():
            return True
        if time.monotonic() < self.end:
            return None
        if self.condition():  # one last look: the deadline may have passed during a slow poll
            return True
        if self.what is not None:
            raise AssertionError(f"timed out after {self.timeout} s waiting for {self.what}")
        return False


def wait_for(
    condition: Callable[[], object], timeout: float = DEFAULT_TIMEOUT_S, what: str | None = None, *,
    interval: float = DEFAULT_INTERVAL_S,
) -> bool:
    """Poll ``condition()`` until it is true (True) or ``timeout`` seconds pass.

    On timeout: False, for ``assert wait_for(...)`` with a message of the caller's; with ``what``,
    an AssertionError "timed out after N s waiting for <what>" instead.
    """
    deadline = _Deadline(condition, timeout, what)
    while (done := deadline.outcome()) is None:
        time.sleep(interval)
    return done


async def async_wait_for(
    condition: Callable[[], object], timeout: float = DEFAULT_TIMEOUT_S, what: str | None = None, *,
    interval: float = DEFAULT_INTERVAL_S,
) -> bool:
    """``wait_for`` for code on an event loop: the loop keeps running between polls."""
    deadline = _Deadline(condition, timeout, what)
    while (done := deadline.outcome()) is None:
        await asyncio.sleep(interval)
    return done


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` now (a server up, or still up)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True

"""systemd's sd_notify protocol in a few lines, so Type=notify and WatchdogSec= need no dependency.

A datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; a name
starting with '@' is in the abstract namespace (leading NUL byte). Outside systemd it is a no-op.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(__name__)


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=watching 2 mailboxes") to systemd.

    Returns True when it was sent, False when not running under systemd or the send failed
    (a notification is never worth crashing the service for).
    """
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(name))
            # Never block the event loop: a receiver whose queue is full (only ~10 datagrams by
            # default) costs us this one notification, not a stalled service.
            sock.send(state.encode(), socket.MSG_DONTWAIT)
        return True
    except OSError as exc:
        log.warning("sd_notify_failed", socket=name, error=str(exc))
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is set.

    Honours $WATCHDOG_PID: a watchdog meant for another process (e.g. a wrapper) is not ours.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("watchdog_usec_invalid", value=usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000

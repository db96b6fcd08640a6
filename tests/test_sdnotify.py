"""sd_notify against a real AF_UNIX datagram socket, path and abstract names."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtriage.service import sdnotify

pytestmark = pytest.mark.component  # real AF_UNIX sockets


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_notify_sends_datagram_to_path_socket(receiver: socket.socket) -> None:
    assert sdnotify.notify("READY=1\nSTATUS=watching 2 mailboxes")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=watching 2 mailboxes"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mailtriage-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_systemd_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_notify_to_missing_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("10000000", None, 5.0),
        ("0", None, None),
        ("junk", None, None),
        ("4000000", "self", 2.0),
        ("4000000", "1", None),  # a watchdog meant for another process
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == expected


def test_full_receiver_queue_never_blocks(receiver: socket.socket) -> None:
    # Nobody reads: after the kernel's small datagram queue fills, notify drops instead of blocking.
    import time

    started = time.monotonic()
    results = [sdnotify.notify("WATCHDOG=1") for _ in range(2000)]  # > net.unix.max_dgram_qlen
    assert time.monotonic() - started < 10
    assert results[0] is True and False in results

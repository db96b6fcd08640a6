"""Outbound HTTP with a total deadline, a byte cap and no redirects: how mailtriage calls other servers.

urllib's ``timeout`` bounds each socket operation, not the call: a server that trickles one byte a
second keeps a call (and the thread waiting on it) alive for ever, and an answer of any size is read
whole into memory; urllib also follows redirects to wherever they point. The inference server and the
OAuth token endpoints are reached through ``post`` instead: every socket operation (connect, TLS
handshake, send, each read) gets only the time left until one deadline for the whole call, the body
is refused past ``max_bytes`` without reading it whole, and a 3xx is returned like any other status,
never followed. Standard library only (http.client, socket, ssl).

Name resolution (getaddrinfo) is the one step the deadline cannot interrupt; it is bounded by the
resolver's own timeouts.
"""

from __future__ import annotations

import http.client
import math
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, Literal

FailureKind = Literal["unreachable", "deadline", "too_large", "bad_http"]


class CallFailed(Exception):
    """No complete answer: ``kind`` says why.

    "unreachable" (refused, reset, DNS) and "deadline" are the server's trouble now, worth a retry;
    "too_large" and "bad_http" (not HTTP, or cut short) say the server answers junk.
    """

    def __init__(self, message: str, *, kind: FailureKind) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: Message
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get_content_type() if self.headers.get("Content-Type") else "(none)"


class _PastDeadline(TimeoutError):
    pass


def _arm(sock: socket.socket, deadline: float) -> None:
    # Each operation may use only the time left: a trickle of bytes cannot stretch the call.
    left = deadline - time.monotonic()
    if left <= 0:
        raise _PastDeadline("the call's deadline passed")
    sock.settimeout(left)


class _DeadlineSocket(socket.socket):
    deadline = math.inf

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        _arm(self, self.deadline)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        _arm(self, self.deadline)
        return super().recv(bufsize, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        _arm(self, self.deadline)
        return super().send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        _arm(self, self.deadline)  # CPython bounds a whole sendall by the timeout, not each chunk
        super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    deadline = math.inf

    def do_handshake(self, block: bool = False) -> None:
        _arm(self, self.deadline)  # _ssl bounds the whole handshake by the timeout
        super().do_handshake(block)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002 - ssl.SSLSocket's signature
        _arm(self, self.deadline)
        return super().read(len, buffer)

    def send(self, data: Any, flags: int = 0) -> int:
        _arm(self, self.deadline)
        return super().send(data, flags)


_tls: ssl.SSLContext | None = None
_tls_guard = threading.Lock()


def _tls_context() -> ssl.SSLContext:
    global _tls
    with _tls_guard:
        if _tls is None:
            context = ssl.create_default_context()  # verification on, the system's CA store
            context.sslsocket_class = _DeadlineSSLSocket
            _tls = context
        return _tls


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, deadline: float, tls: bool) -> None:
        super().__init__(host, port, timeout=max(0.001, deadline - time.monotonic()))
        self._deadline = deadline
        self._tls = tls

    def connect(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _PastDeadline("the call's deadline passed before connecting")
        raw = socket.create_connection((self.host, self.port), timeout=left)
        sock = _DeadlineSocket(fileno=raw.detach())
        sock.deadline = self._deadline
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._tls:
            self.sock = sock
            return
        try:
            wrapped = _tls_context().wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        assert isinstance(wrapped, _DeadlineSSLSocket)
        wrapped.deadline = self._deadline
        self.sock = wrapped
        wrapped.do_handshake()


def post(
    url: str,
    body: bytes,
    *,
    headers: Mapping[str, str],
    deadline_s: float,
    max_bytes: int,
) -> Answer:
    """POST ``body`` to ``url`` and return the answer, whatever its status (a 3xx is not followed).

    Raises CallFailed when no complete answer came within ``deadline_s`` seconds of the call, when the
    body would exceed ``max_bytes`` (refused on its Content-Length before reading, or as soon as
    more arrives), or when the server cannot be reached or does not speak HTTP.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + deadline_s
    conn = _Connection(parts.hostname, port, deadline, tls)
    where = f"{parts.scheme}://{parts.netloc}"
    try:
        conn.request("POST", target, body=body, headers={**headers, "Connection": "close"})
        response = conn.getresponse()
        if response.length is not None and response.length > max_bytes:
            raise CallFailed(
                f"{url} answered HTTP {response.status} with Content-Length {response.length}, over the "
                f"{max_bytes}-byte cap for this call; not read", kind="too_large",
            )
        data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise CallFailed(f"{url} answered more than the {max_bytes}-byte cap for this call; the rest was not read",
                             kind="too_large")
        return Answer(response.status, response.reason, response.msg, data)
    except TimeoutError as exc:  # socket.timeout is TimeoutError; _PastDeadline too
        raise CallFailed(f"{where} gave no complete answer within the {deadline_s:g} s deadline of the call",
                         kind="deadline") from exc
    except http.client.RemoteDisconnected as exc:  # also a ConnectionResetError: keep it "unreachable"
        raise CallFailed(f"{where} closed the connection without an answer", kind="unreachable") from exc
    except http.client.HTTPException as exc:  # not HTTP, a header line too long, a body cut short
        raise CallFailed(f"{where} answered something that is not complete HTTP: {type(exc).__name__}: {exc!s:.120}",
                         kind="bad_http") from exc
    except OSError as exc:  # refused, reset, unreachable, DNS, TLS verification
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CallFailed(f"cannot reach {where}: {reason}", kind="unreachable") from exc
    finally:
        conn.close()


__all__ = ["Answer", "CallFailed", "post"]

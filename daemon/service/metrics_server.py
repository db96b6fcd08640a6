"""``GET /metrics`` on the daemon's own event loop, bounded so that no flood of connections to the
metrics port can take threads or descriptors from mail delivery.

prometheus_client's ``start_http_server`` spends one thread per connection and never times an idle
one out: 2,041 idle connections held 2,040 threads and every descriptor, and SMTP delivery stalled.
Here a connection is a coroutine on the loop the SMTP filter already runs on; its request must
arrive whole within ``read_timeout`` and ``max_request_bytes``, and at most ``max_connections`` are
held. A new connection beyond that closes the one that has waited longest without sending a
request (a real scraper sends its request at once, so an idle flood cannot lock it out), or, when
every held connection is being answered, is itself closed at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from mailtriage import metrics

log = structlog.get_logger(__name__)

MAX_CONNECTIONS = 16
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 8192
_LOG_EVERY_S = 60.0  # a flood is logged, but not once per connection

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def _parse(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Request line and headers of an HTTP/1.x request head (pure; ValueError when malformed)."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not HTTP/1.x: {version!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


def respond(head: bytes, registry: CollectorRegistry) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request head."""
    try:
        method, path, headers = _parse(head)
    except ValueError:
        return 400, "text/plain", b"malformed request\n"
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"only GET /metrics\n"
    if path not in ("/metrics", "/"):
        return 404, "text/plain", b"only /metrics is served here\n"
    encoder, content_type = choose_encoder(headers.get("accept", ""))
    try:
        body = encoder(registry)
    except Exception as exc:  # noqa: BLE001 - a broken collector must not kill the connection handler
        log.error("metrics_collect_failed", error=str(exc), error_type=type(exc).__name__)
        return 500, "text/plain", b"collecting the metrics failed; see the daemon log\n"
    return 200, content_type, b"" if method == "HEAD" else body


class MetricsServer:
    """The bounded server; ``await start(host, port)``, ``await close()``.

    ``open_connections`` is how many are held now (what a flood can grow at most to the cap).
    """

    def __init__(
        self,
        registry: CollectorRegistry = metrics.REGISTRY,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT_S,
        write_timeout: float = WRITE_TIMEOUT_S,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_request_bytes = max_request_bytes
        # Held connections, oldest first; the value says whether its request has arrived.
        self._conns: dict[asyncio.StreamWriter, bool] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._closed: dict[str, int] = {}
        self._last_log = 0.0

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        # limit: the StreamReader refuses a request head longer than the cap instead of buffering it.
        self._server = await asyncio.start_server(self._handle, host, port, limit=self.max_request_bytes)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _drop(self, reason: str, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()
        metrics.METRICS_CLOSED.labels(reason=reason).inc()
        self._closed[reason] = self._closed.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning("metrics_connections_closed", closed=dict(self._closed), held=len(self._conns),
                        max_connections=self.max_connections,
                        hint="something opens connections to metrics_port without scraping; mail is unaffected")
            self._closed.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.max_connections:
            idle = next((w for w, answering in self._conns.items() if not answering), None)
            if idle is None:
                self._drop("refused", writer)
                return
            del self._conns[idle]
            self._drop("evicted", idle)
        self._conns[writer] = False
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            except asyncio.TimeoutError:
                self._drop("timeout", writer)
                return
            except (asyncio.LimitOverrunError, ValueError):
                status, content_type, body = 431, "text/plain", b"request too large\n"
                metrics.METRICS_CLOSED.labels(reason="too_large").inc()
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client went away, or was evicted
            else:
                status, content_type, body = respond(head, self.registry)
            if writer not in self._conns:
                return  # evicted in the meantime
            self._conns[writer] = True
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1") + body
            )
            try:
                await asyncio.wait_for(writer.drain(), self.write_timeout)
            except (asyncio.TimeoutError, ConnectionError):
                self._drop("timeout", writer)
                return
            writer.close()
        finally:
            self._conns.pop(writer, None)
            self._tasks.discard(task)


async def start_metrics_server(host: str, port: int, **limits: float) -> MetricsServer | None:
    """Serve ``metrics.REGISTRY`` on http://host:port/metrics on the running loop; port 0 means off.

    ``limits``: MetricsServer's keyword arguments (tests use small ones). Raises OSError when the
    port cannot be bound.
    """
    if not port:
        return None
    server = MetricsServer(**limits)  # type: ignore[arg-type]
    await server.start(host, port)
    log.info("metrics_server_started", host=host, port=server.port, max_connections=server.max_connections,
             read_timeout_s=server.read_timeout)
    return server

"""The metrics port against real sockets: it answers a scrape, and a flood of idle connections
neither takes threads nor locks out the scraper or mail delivery."""

from __future__ import annotations

import asyncio
import smtplib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session, SMTP

from mailtriage import metrics
from mailtriage.core.labels import LabelSet
from mailtriage.model import modeldir
from mailtriage.service.metrics_server import MAX_CONNECTIONS, MetricsServer, respond, start_metrics_server
from mailtriage.testing.builders import mail, make_config, relay_table
from mailtriage.testing.fakes import KeywordClassifier
from mailtriage.testing.waits import async_wait_for
from mailtriage.testing.imapserver import free_port

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _threads() -> set[str]:
    """This process's threads, less the loop's default executor (to_thread may add a worker at any
    time; the scrape and the delivery here use it): what the metrics server could have started."""
    return {f"{t.name}#{t.ident}" for t in threading.enumerate() if not t.name.startswith("asyncio_")}


def _closed(reader: asyncio.StreamReader) -> bool:
    """The server closed this connection (FIN or RST), seen without reading from it."""
    return reader.at_eof() or reader.exception() is not None


@pytest.mark.pure
def test_respond_serves_only_get_metrics() -> None:
    registry = metrics.REGISTRY
    status, ctype, body = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", registry)
    assert status == 200 and ctype.startswith("text/plain") and b"mailtriage_messages" in body
    assert respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", registry)[::2] == (200, b"")
    assert respond(b"GET /other HTTP/1.1\r\n\r\n", registry)[0] == 404
    assert respond(b"POST /metrics HTTP/1.1\r\n\r\n", registry)[0] == 405
    assert respond(b"\x16\x03\x01garbage\r\n\r\n", registry)[0] == 400
    status, ctype, _ = respond(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n", registry)
    assert status == 200 and ctype.startswith("application/openmetrics-text")


@pytest.mark.component  # binds a port, serves HTTP
def test_metrics_server_serves_registry() -> None:
    async def main() -> str:
        assert await start_metrics_server("127.0.0.1", 0) is None  # port 0: off
        server = await start_metrics_server("127.0.0.1", free_port())
        assert server is not None
        try:
            metrics.MESSAGES.labels(category="billing", outcome="filed").inc()
            metrics.QUEUE_DEPTH.labels(account="support", mailbox="INBOX").set(3)
            return await asyncio.to_thread(_scrape, server.port)
        finally:
            await server.close()

    body = asyncio.run(main())
    assert 'mailtriage_messages_total{category="billing",outcome="filed"}' in body
    assert 'mailtriage_queue_depth{account="support",mailbox="INBOX"} 3.0' in body
    assert "mailtriage_classify_batch_seconds_bucket" in body


@pytest.mark.component
def test_idle_slow_and_oversized_clients_are_closed() -> None:
    async def main() -> None:
        server = MetricsServer(max_connections=3, read_timeout=0.5, max_request_bytes=1024)
        await server.start("127.0.0.1", 0)
        try:
            # A request head that never ends is cut at the size cap, answered 431.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 4096)
            reply = await asyncio.wait_for(reader.read(), 5)
            assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
            writer.close()
            # A trickle that never completes the request is closed at the read timeout.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /met")
            await async_wait_for(lambda: _closed(reader), 5, "the server to close a request that never ended")
            writer.close()
            # Over the cap: the oldest idle connection goes, the newest is served.
            idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
            await async_wait_for(lambda: server.open_connections == 3, 5, "three idle connections held")
            body = await asyncio.to_thread(_scrape, server.port)
            assert "mailtriage_messages" in body
            assert _closed(idle[0][0]) and server.open_connections <= 3
            for _, w in idle:
                w.close()
        finally:
            await server.close()

    asyncio.run(main())


class _NextHop:
    """A real SMTP next hop that keeps what it accepts."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.received.append(envelope.content)
        return "250 OK queued"


@pytest.fixture
def next_hop() -> Iterator[tuple[_NextHop, int]]:
    handler, port = _NextHop(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="nexthop.test")
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def _send(port: int, body: str) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        return client.sendmail("customer@example.com", ["support@example.com"], mail(body, message_id="", linesep="\n"))


@pytest.mark.component
def test_idle_flood_on_the_metrics_port_holds_no_threads_and_blocks_nothing(
    tmp_path: Path, next_hop: tuple[_NextHop, int]
) -> None:
    """prometheus_client's server spent a thread per connection: 300 idle ones were 300 threads, and
    at 2,041 every descriptor was gone and SMTP delivery stalled."""
    from mailtriage.service.app import Service

    hop, hop_port = next_hop
    listen, metrics_port = free_port(), free_port()
    models = tmp_path / "models"
    (models / "v1").mkdir(parents=True)
    LabelSet(tuple(CATEGORIES)).save(models / "v1")
    modeldir.promote(models, models / "v1")
    config = make_config(tmp_path, categories=CATEGORIES, smtp=relay_table(listen, hop_port),
                         model={"path": str(models), "device": "cpu"}, metrics_port=metrics_port)
    classifier = KeywordClassifier(tuple(CATEGORIES), {"invoice": "billing"}, version="v1")
    service = Service(config, None, load_model=lambda path: classifier)
    flood_size = 300

    async def main() -> tuple[set[str], set[str], int, str]:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 15)
        # Warm up what a scrape and a delivery start (the default executor's threads), then count.
        assert "mailtriage_messages" in await asyncio.to_thread(_scrape, metrics_port)
        assert await asyncio.to_thread(_send, listen, "warm-up invoice") == {}
        threads_before = _threads()
        flood = [await asyncio.open_connection("127.0.0.1", metrics_port) for _ in range(flood_size)]
        await async_wait_for(lambda: sum(not _closed(r) for r, _ in flood) <= MAX_CONNECTIONS, 15,
                        f"the server to hold at most {MAX_CONNECTIONS} of {flood_size} idle connections")
        body = await asyncio.to_thread(_scrape, metrics_port)
        refused = await asyncio.to_thread(_send, listen, "my invoice is wrong")
        assert refused == {}
        held = sum(not _closed(r) for r, _ in flood)
        threads_after = _threads()
        for _, writer in flood:
            writer.close()
        service.stop()
        await asyncio.wait_for(task, 20)
        return threads_before, threads_after, held, body

    threads_before, threads_after, held, body = asyncio.run(main())
    assert len(threads_after) <= len(threads_before), f"threads started under the flood: {threads_after - threads_before}"
    assert held <= MAX_CONNECTIONS
    assert "mailtriage_metrics_connections_closed_total" in body
    assert len(hop.received) == 2 and b"X-Mailtriage-Category: billing" in hop.received[1]

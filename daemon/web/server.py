"""Serving the console: `mailtriage web` on its own, or a start hook that runs it inside `serve` on the
daemon's event loop (``[web] enabled = true``).

The listening socket is bound here, not by uvicorn, so a port in use is a ConfigError naming the key;
and uvicorn's own signal handling is turned off, because the daemon's SIGTERM handler must stay the
one that stops everything in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import structlog

from mailtriage.config import Config
from mailtriage.errors import ConfigError

if TYPE_CHECKING:
    from mailtriage.service.app import Service
    from mailtriage.store.state import StateDB

log = structlog.get_logger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (ConfigError when it cannot be had)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"cannot serve the console on {host}:{port}: {exc.strerror or exc}; pick a free "
                          "web.listen_port (or stop what listens there)") from exc
    sock.setblocking(False)
    return sock


def _server(app: Any) -> Any:
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the daemon (or `web`'s asyncio.run) owns signals
            yield

    # log_config None: uvicorn keeps the stdlib logging the CLI configured (one stream, one format).
    return QuietServer(uvicorn.Config(app, log_config=None, lifespan="off", access_log=False,
                                      proxy_headers=False, server_header=False))


async def run_console(config: Config, state: StateDB | None = None, stop: asyncio.Event | None = None,
                      sock: socket.socket | None = None) -> None:
    """Serve the console until ``stop`` is set (or forever); ``sock``: already bound (else bound here)."""
    from mailtriage.web.app import create_app

    sock = sock if sock is not None else bind(config.web.listen_host, config.web.listen_port)
    try:
        server = _server(create_app(config, state))
        task = asyncio.create_task(server.serve(sockets=[sock]), name="web-console")
        log.info("web_console_listening", url=console_url(config), allow_actions=config.web.allow_actions)
        waiter = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            await asyncio.wait({task} | ({waiter} if waiter else set()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if waiter is not None:
                waiter.cancel()
            server.should_exit = True
            await asyncio.gather(task, return_exceptions=True)
    finally:
        sock.close()


def console_url(config: Config) -> str:
    host = config.web.listen_host
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.web.listen_port}/"


async def start_web(service: Service) -> Callable[[], Awaitable[None]]:
    """The Service's on_start hook for ``[web] enabled = true``: the console on the daemon's loop,
    sharing its state database. A port in use fails the start, like the SMTP filter's."""
    stop = asyncio.Event()
    sock = bind(service.config.web.listen_host, service.config.web.listen_port)
    task = asyncio.create_task(run_console(service.config, service.state, stop, sock), name="web-console-hook")

    async def close() -> None:
        stop.set()
        await task

    return close

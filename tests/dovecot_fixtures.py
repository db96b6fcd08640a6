"""pytest fixtures around the real Dovecot harness (`mailtriage.testing.dovecot`)."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from imapclient import IMAPClient

from mailtriage.testing.dovecot import Dovecot, DovecotError


def _start_or_fail(server: Dovecot) -> Dovecot:
    # A missing Dovecot must fail loudly, never skip: CI has to exercise the real server.
    try:
        return server.start()
    except DovecotError as exc:
        message = str(exc)
    server.stop()
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback in the report


_user_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One Dovecot for the whole session; tests isolate themselves with `imap_user`."""
    server = _start_or_fail(Dovecot())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def imap_user(dovecot: Dovecot) -> tuple[str, str]:
    """A fresh user (empty mailbox) on the session server: (username, password)."""
    name = f"user{next(_user_numbers)}-{secrets.token_hex(3)}"
    password = secrets.token_hex(8)
    dovecot.add_user(name, password)
    return name, password


@pytest.fixture
def imap(dovecot: Dovecot, imap_user: tuple[str, str]) -> Iterator[IMAPClient]:
    """A logged-in IMAPClient for a fresh user (request `imap_user` too to know who)."""
    client = dovecot.client(*imap_user)
    try:
        yield client
    finally:
        try:
            client.logout()
        except Exception:  # noqa: BLE001 - a test may have closed it already
            client.shutdown()


@pytest.fixture
def dovecot_factory() -> Iterator[Callable[..., Dovecot]]:
    """Start extra servers: `dovecot_factory(extra_conf=NO_MOVE, users=None, learn_script=...)`; all stop at teardown."""
    servers: list[Dovecot] = []

    def make(extra_conf: str = "", users: dict[str, str] | None = None, **options: Any) -> Dovecot:
        server = Dovecot(extra_conf=extra_conf, users=users, **options)
        servers.append(server)
        return _start_or_fail(server)

    try:
        yield make
    finally:
        for server in servers:
            server.stop()

"""pytest fixtures around the real Cyrus IMAP harness (`mailtriage.testing.cyrus`)."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator

import pytest

from mailtriage.testing.cyrus import Cyrus, CyrusError


@pytest.fixture(scope="session")
def cyrus() -> Iterator[Cyrus]:
    """One Cyrus for the session (started on first use); tests isolate themselves with `cyrus_user`."""
    server = Cyrus()
    message = ""
    try:
        server.start()
    except CyrusError as exc:
        message = str(exc)
    if message:
        server.stop()
        # A missing Cyrus fails loudly, never skips: CI must exercise the second real server.
        pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback in the report
    try:
        yield server
    finally:
        server.stop()


_numbers = itertools.count(1)


@pytest.fixture
def cyrus_user(cyrus: Cyrus) -> tuple[str, str]:
    """A fresh user (INBOX created at first login) on the session Cyrus: (username, password)."""
    name = f"cyr{next(_numbers)}-{secrets.token_hex(3)}"
    password = secrets.token_hex(8)
    cyrus.add_user(name, password)
    return name, password

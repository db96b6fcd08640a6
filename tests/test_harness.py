"""The test harness's own pure logic (mailtriage.testing), where a mistake would show up as a flaky test elsewhere."""

from __future__ import annotations

import pytest


class _SameKernelPort:
    """A socket whose bind(port 0) gets the ports in ``ports`` in turn, as a kernel may: the same twice."""

    ports = [40001, 40001, 40002]

    def __init__(self, *args: object) -> None:
        pass

    def __enter__(self) -> _SameKernelPort:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        self.port = _SameKernelPort.ports.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@pytest.mark.pure
def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two servers given the same "free" port connect to each other: a Postfix whose down milter
    # had its own smtpd's port fed the milter handshake to its smtpd and never greeted.
    import mailtriage.testing.imapserver as imapserver

    monkeypatch.setattr(imapserver.socket, "socket", _SameKernelPort)
    monkeypatch.setattr(imapserver, "_handed_out", set())
    assert [imapserver.free_port(), imapserver.free_port()] == [40001, 40002]

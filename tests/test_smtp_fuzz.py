"""A CI-sized slice of the SMTP front and tagging fuzz (the long run: ``python -m benchmarks.fuzz_smtp``).

The SMTP part is a real relay on a real socket with a real aiosmtpd next hop; every reply must be
a well-formed SMTP reply, no handler error may be logged, and every message the front accepted
must reach the next hop exactly once, CRLF only, with our X-Mailtriage-* fields the only ones.
"""

from __future__ import annotations

import contextlib
import logging

import pytest

from mailtriage.testing.smtp_fuzz import check_relayed, forged_mail, fuzz_smtp, fuzz_tagging, relay_with_next_hop
from mailtriage.testing.waits import wait_for


@pytest.mark.pure
def test_forged_generator_is_replayable() -> None:
    assert forged_mail(5, 11) == forged_mail(5, 11)
    assert len({forged_mail(5, i) for i in range(50)}) == 50


@pytest.mark.pure
def test_tagging_survives_600_forged_hostile_messages() -> None:
    report = fuzz_tagging(600, seed=20261203)
    assert report.inputs == 600
    assert report.failures == []


@pytest.mark.component
def test_smtp_front_survives_1500_fuzzed_inputs() -> None:
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's per-bogus-command warnings
    with contextlib.contextmanager(relay_with_next_hop)() as relay:
        report = fuzz_smtp(relay.port, 1500, seed=20261203)
        wait_for(lambda: len(relay.received) >= report.counts.get("delivered", 0), 10)
        received, errors = list(relay.received), list(relay.errors)
    assert report.failures == []
    assert errors == []  # no handler error, no traceback
    assert report.counts.get("delivered", 0) >= 10  # the run did get messages through
    assert len(received) == report.counts["delivered"]  # each accepted message once downstream
    assert check_relayed(received) == []

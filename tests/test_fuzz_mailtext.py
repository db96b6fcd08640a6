"""A CI-sized slice of the mail-text fuzz (the long run: ``python -m benchmarks.fuzz_mailtext``)."""

from __future__ import annotations

import pytest

from mailtriage.testing.fuzz import hostile_message, run_mailtext_fuzz

pytestmark = pytest.mark.pure


def test_generator_is_replayable_and_varied() -> None:
    assert hostile_message(3, 17) == hostile_message(3, 17)
    sample = {hostile_message(3, i) for i in range(50)}
    assert len(sample) == 50
    assert any(b"\x00" in m for m in (hostile_message(3, i) for i in range(300)))  # it does reach NULs


def test_mail_text_survives_500_hostile_inputs_without_a_fallback() -> None:
    report = run_mailtext_fuzz(seed=20261203, n=500)
    assert report["failures"] == []
    assert report["fallbacks"] == {}

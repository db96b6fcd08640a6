"""Shared fixtures. Each fixture family lives in its own module, imported here so pytest sees it."""

from __future__ import annotations

import os

# Tests never reach a model hub; everything they load is built locally or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.dovecot_fixtures import dovecot, dovecot_factory, imap, imap_user  # noqa: E402, F401
from tests.cyrus_fixtures import cyrus, cyrus_user  # noqa: E402, F401
from tests.models import tiny_decoder_base, tiny_encoder_base, tiny_model_dir  # noqa: E402,F401  (tiny model fixtures)

import pytest  # noqa: E402
import structlog  # noqa: E402


@pytest.fixture(autouse=True)
def _structlog_defaults_after_each_test():  # type: ignore[no-untyped-def]
    """A command's main() configures structlog for the process (its level filter included); reset
    it after each test so a later test's capture_logs() sees every event at every level."""
    yield
    structlog.reset_defaults()


TIERS = ("pure", "component", "slow")


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Every test belongs to exactly one tier, so `-m pure` / `-m "not slow"` select what they say."""
    wrong = []
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {sorted(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            "each test needs exactly one tier marker (pytest.mark.pure / component / slow):\n  " + "\n  ".join(wrong)
        )

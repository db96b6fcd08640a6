"""The SIGKILL proof, fast version: real worker processes killed with SIGKILL at
chosen points (right after an action, before its status is written; after 'pending', before the
action) and at random times while filing a backlog in a real Dovecot, restarted each time; two
workers on one mailbox at once. The long run (>= 20 kills, 1,000 messages) is
benchmarks/kill_proof.py, with its figures in benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailtriage.testing.killproof import KILL_POINTS, run_proof, run_two_workers

pytestmark = pytest.mark.component


def test_sigkill_at_chosen_and_random_points_loses_and_duplicates_nothing(
    dovecot: Any, imap_user: tuple[str, str], tmp_path: Path
) -> None:
    result = run_proof(dovecot, *imap_user, tmp_path, messages=60, kills=3, fetch_batch=5, seed=3)
    assert result.kills_by_point == dict.fromkeys(KILL_POINTS, 1), result.as_dict()
    assert result.ok, result.as_dict()
    assert (result.lost, result.duplicated, result.decisions_not_one) == (0, 0, 0)
    assert sum(result.per_folder.values()) == 60


def test_two_worker_processes_on_one_mailbox_file_each_message_once(
    dovecot: Any, imap_user: tuple[str, str], tmp_path: Path
) -> None:
    result = run_two_workers(dovecot, *imap_user, tmp_path, messages=40)
    assert result.ok and not result.notes, result.as_dict()
    logs = "".join(p.read_text() for p in tmp_path.glob("worker-two-*.log"))
    assert "another mailtriage worker is filing" in logs  # the second one waited for the first

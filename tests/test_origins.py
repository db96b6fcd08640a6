"""Origins of training labels (staff, correction, daemon) and training.auto_filed, as pure tables."""

from __future__ import annotations

import pytest

from mailtriage_trainer.origins import (
    CORRECTION, DAEMON, STAFF, Filing, Policy, describe, describe_daemon, origin_of, sort_examples, unchecked,
)
from mailtriage_trainer.sources import Example

pytestmark = pytest.mark.pure

DAY = 86400.0
NOW = 1_800_000_000.0


def ex(key: str, label: str) -> Example:
    return Example(text=f"text of {key}", label=label, key=key, date=None, source=f"imap://a/{label}/{key}")


# (the example's key and label, the daemon's filing of that key or None, corrections, expected origin)
ORIGIN_TABLE = [
    (("<a>", "billing"), None, [], STAFF),                                             # never decided
    (("<a>", "billing"), Filing("<a>", "billing", False, NOW), [], DAEMON),             # filed, left in place
    (("<a>", "billing"), Filing("<a>", "login", False, NOW), [], CORRECTION),           # moved, scan not run yet
    (("<a>", "billing"), Filing("<a>", "login", False, NOW), [("<a>", "billing")], CORRECTION),
    (("<a>", "billing"), Filing("<a>", "billing", True, NOW), [], CORRECTION),          # sorted out of unsure
    (("<a>", "billing"), Filing("<a>", "login", True, NOW), [("<a>", "billing")], CORRECTION),
    (("<a>", "billing"), None, [("<a>", "billing")], CORRECTION),                       # only the correction known
    (("<a>", "billing"), Filing("<b>", "billing", False, NOW), [], STAFF),              # another message's filing
    (("<a>", "billing"), Filing("<a>", "billing", False, NOW), [("<a>", "login")], DAEMON),  # moved back: daemon's label
]


@pytest.mark.parametrize(("example", "filing", "corrections", "expected"), ORIGIN_TABLE)
def test_origin_of_each_example(example: tuple[str, str], filing: Filing | None,
                                corrections: list[tuple[str, str]], expected: str) -> None:
    filings = {filing.key: filing} if filing else {}
    assert origin_of(ex(*example), filings, set(corrections)) == expected


# (policy, age of the daemon's filing in days, kept for training)
POLICY_TABLE = [
    (Policy("include", 7), 0.0, True),
    (Policy("include", 7), 30.0, True),
    (Policy("exclude", 7), 0.0, False),
    (Policy("exclude", 7), 365.0, False),
    (Policy("after_days", 7), 6.99, False),
    (Policy("after_days", 7), 7.0, True),
    (Policy("after_days", 7), 8.0, True),
    (Policy("after_days", 1), 1.5, True),
    (Policy("after_days", 30), 29.0, False),
]


@pytest.mark.parametrize(("policy", "age_days", "kept"), POLICY_TABLE)
def test_policy_keeps_a_filing_by_its_age(policy: Policy, age_days: float, kept: bool) -> None:
    assert policy.keeps(Filing("<a>", "billing", False, NOW - age_days * DAY), NOW) is kept


def _mailbox() -> tuple[list[Example], list[Filing], list[tuple[str, str]]]:
    examples = [ex("<s1>", "billing"), ex("<s2>", "login"),          # staff history
                ex("<c1>", "login"),                                # filed as billing, moved to login
                ex("<u1>", "billing"),                              # unsure, sorted by staff
                ex("<d-old>", "billing"), ex("<d-new>", "login")]   # filed and left in place
    filings = [Filing("<c1>", "billing", False, NOW - 2 * DAY), Filing("<u1>", "login", True, NOW - DAY),
               Filing("<d-old>", "billing", False, NOW - 10 * DAY), Filing("<d-new>", "login", False, NOW - DAY),
               Filing("<never-harvested>", "login", False, NOW)]
    return examples, filings, [("<c1>", "login")]


@pytest.mark.parametrize(("mode", "daemon_keys", "skipped"), [
    ("include", ["<d-old>", "<d-new>"], 0),
    ("exclude", [], 2),
    ("after_days", ["<d-old>"], 1),
])
def test_sort_examples_counts_each_origin_and_keeps_daemon_filings_out_of_the_truth(
    mode: str, daemon_keys: list[str], skipped: int,
) -> None:
    examples, filings, corrections = _mailbox()
    got = sort_examples(examples, filings, corrections, Policy(mode, 7), now=NOW)
    assert [e.key for e in got.truth] == ["<s1>", "<s2>", "<c1>", "<u1>"]
    assert [e.key for e in got.daemon] == daemon_keys
    assert got.counts == {"staff": 2, "corrections": 2, "daemon": len(daemon_keys), "daemon_skipped": skipped,
                          "auto_filed": mode, "auto_filed_days": 7}


def test_the_latest_decision_of_a_key_counts() -> None:
    # Decided twice (e.g. the IMAP watcher, and earlier the SMTP filter): the newer decision stands.
    filings = [Filing("<a>", "login", False, NOW - 20 * DAY), Filing("<a>", "billing", False, NOW - DAY)]
    got = sort_examples([ex("<a>", "billing")], filings, [], Policy("after_days", 7), now=NOW)
    assert got.counts["daemon_skipped"] == 1 and not got.truth
    got = sort_examples([ex("<a>", "billing")], list(reversed(filings)), [], Policy("after_days", 7), now=NOW)
    assert got.counts["daemon_skipped"] == 1


@pytest.mark.parametrize(("counts", "sentence"), [
    ({"daemon": 148, "daemon_skipped": 0, "auto_filed": "include", "auto_filed_days": 7},
     '148 filed by the daemon and left in place: included (training.auto_filed = "include")'),
    ({"daemon": 0, "daemon_skipped": 148, "auto_filed": "exclude", "auto_filed_days": 7},
     '148 filed by the daemon and left in place: left out (training.auto_filed = "exclude")'),
    ({"daemon": 120, "daemon_skipped": 28, "auto_filed": "after_days", "auto_filed_days": 7},
     ("148 filed by the daemon and left in place: 120 filed at least 7 days ago included, 28 newer left out "
      '(training.auto_filed = "after_days")')),
    ({"daemon": 0, "daemon_skipped": 0, "auto_filed": "exclude", "auto_filed_days": 7},
     "none filed by the daemon and left in place"),
])
def test_the_sentence_the_log_and_the_report_show(counts: dict[str, object], sentence: str) -> None:
    assert describe_daemon(counts) == sentence


def test_without_a_state_database_every_example_is_staff_and_it_says_why() -> None:
    got = unchecked([ex("<a>", "billing"), ex("<b>", "login")], Policy("exclude", 7), "no state database at /x")
    assert len(got.truth) == 2 and not got.daemon
    assert got.counts["staff"] == 2 and got.counts["unchecked"] == "no state database at /x"
    assert describe(got.counts) == ("All 2 counted as sorted by staff: the daemon's filings could not be told "
                                    "apart (no state database at /x)")

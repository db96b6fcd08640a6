"""Dataset hygiene: dedupe by key and content, the time-ordered / stratified split, class checks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from mailtriage.errors import TrainingDataError
from mailtriage_trainer.dataset import check_min_examples, dedupe, is_time_ordered, split, summary
from mailtriage_trainer.sources import Example

pytestmark = pytest.mark.pure

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def ex(text: str, label: str, key: str | None = None, day: int | None = None) -> Example:
    return Example(text=text, label=label, key=key or f"<{text}@x>",
                   date=None if day is None else T0 + timedelta(days=day), source="test")


def test_dedupe_drops_repeated_keys_and_repeated_text() -> None:
    examples = [
        ex("invoice wrong", "billing", key="<a@x>"),
        ex("invoice wrong, resent", "billing", key="<a@x>"),      # same Message-ID
        ex("Invoice   WRONG", "billing", key="<b@x>"),            # same text up to case/space
        ex("cannot login", "login", key="<c@x>"),
    ]
    kept, dropped = dedupe(examples)
    assert dropped == 2
    assert [e.key for e in kept] == ["<a@x>", "<c@x>"]


def test_dedupe_drops_every_copy_whose_labels_conflict() -> None:
    examples = [ex("same text", "billing", key="<1@x>"), ex("same text", "refunds", key="<2@x>"),
                ex("other", "login")]
    kept, dropped = dedupe(examples)
    assert dropped == 2
    assert [e.text for e in kept] == ["other"]


def dated_set(n_per_class: int = 10) -> list[Example]:
    return [ex(f"{label} message {i}", label, day=i) for label in ("a", "b") for i in range(n_per_class)]


def test_time_ordered_split_holds_out_the_newest_of_each_class() -> None:
    examples = dated_set(10)
    assert is_time_ordered(examples)
    train, holdout = split(examples, 0.2, seed=1)
    assert len(holdout) == 4 and len(train) == 16
    for label in ("a", "b"):
        newest_train = max(e.date for e in train if e.label == label)
        oldest_holdout = min(e.date for e in holdout if e.label == label)
        assert newest_train < oldest_holdout
    # time order does not depend on the seed
    assert split(examples, 0.2, seed=99)[1] == holdout


def test_undated_examples_give_a_stratified_deterministic_split() -> None:
    examples = [ex(f"{label} {i}", label) for label in ("a", "b", "c") for i in range(20)]
    assert not is_time_ordered(examples)
    train, holdout = split(examples, 0.25, seed=7)
    assert sorted(e.label for e in holdout) == ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert not {e.key for e in train} & {e.key for e in holdout}
    again = split(list(reversed(examples)), 0.25, seed=7)
    assert {e.key for e in again[1]} == {e.key for e in holdout}    # input order does not matter
    other = split(examples, 0.25, seed=8)
    assert {e.key for e in other[1]} != {e.key for e in holdout}    # the seed does


def test_every_class_gets_at_least_one_example_each_side() -> None:
    examples = [ex("a1", "a"), ex("a2", "a"), *[ex(f"b{i}", "b") for i in range(30)]]
    train, holdout = split(examples, 0.1, seed=0)
    assert [e.label for e in holdout].count("a") == 1
    assert [e.label for e in train].count("a") == 1


def test_mostly_undated_mail_is_not_time_ordered() -> None:
    examples = dated_set(3) + [ex(f"u{i}", "a") for i in range(10)]
    assert not is_time_ordered(examples)


def test_check_min_examples_names_thin_and_missing_classes() -> None:
    examples = [ex(f"a{i}", "a") for i in range(10)] + [ex("b0", "b"), ex("b1", "b")]
    with pytest.raises(TrainingDataError) as err:
        check_min_examples(examples, 5, labels=["a", "b", "c"])
    msg = str(err.value)
    assert "'b': 2" in msg and "'c': 0" in msg and "'a'" not in msg
    assert "min_examples_per_class" in msg
    check_min_examples(examples, 2)  # fine without the configured list


def test_check_min_examples_needs_two_classes() -> None:
    with pytest.raises(TrainingDataError, match="at least 2"):
        check_min_examples([ex(f"a{i}", "a") for i in range(5)], 1)


def test_summary_counts_and_dates() -> None:
    s = summary(dated_set(3) + [ex("u", "a")], labels=["b", "a", "c"])
    assert s["per_class"] == {"b": 3, "a": 4, "c": 0}
    assert s["n"] == 7 and s["dated"] == 6
    assert s["date_min"].startswith("2024-01-01") and s["date_max"].startswith("2024-01-03")

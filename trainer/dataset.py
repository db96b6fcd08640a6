"""Pure dataset hygiene between harvest and training: dedupe, class checks, the held-out split.

The split is time-ordered whenever the mail carries dates: the newest mail of each class is held
out, because the newest mail is what the model will face next week. Without dates it falls back
to a stratified random split, deterministic for a given seed and set of examples.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import structlog

from mailtriage.errors import TrainingDataError
from mailtriage_trainer.sources import Example

log = structlog.get_logger(__name__)

# Share of examples that must carry a date for the split to be time-ordered.
DATED_FRACTION_FOR_TIME_SPLIT = 0.8
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


def content_hash(text: str) -> str:
    # Case and whitespace differences do not make a different message for the model's purposes.
    return hashlib.sha1(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


def dedupe(examples: Sequence[Example]) -> tuple[list[Example], int]:
    """Drop repeats by key (Message-ID), then by normalized text; returns (kept, number dropped).

    Copies with the same label keep the first one. When copies disagree on the label (the same
    message filed in two category folders) the truth is unknown, so every copy is dropped: keeping
    one would teach a coin toss and could leak into the held-out set.
    """
    kept = list(examples)
    conflicts = 0
    for key_of in (lambda e: e.key, lambda e: content_hash(e.text)):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(kept):
            groups[key_of(ex)].append(i)
        drop: set[int] = set()
        for idx in groups.values():
            if len(idx) == 1:
                continue
            if len({kept[i].label for i in idx}) > 1:
                drop.update(idx)
                conflicts += len(idx)
            else:
                drop.update(idx[1:])
        kept = [ex for i, ex in enumerate(kept) if i not in drop]
    dropped = len(examples) - len(kept)
    if dropped:
        log.info("duplicates_dropped", dropped=dropped, with_conflicting_labels=conflicts, kept=len(kept))
    return kept, dropped


def check_min_examples(
    examples: Sequence[Example], min_per_class: int, labels: Sequence[str] | None = None
) -> None:
    """Raise TrainingDataError naming every class with fewer than ``min_per_class`` examples.

    ``labels``: the configured categories; a category with no example at all is named too.
    """
    counts = Counter(e.label for e in examples)
    wanted = list(labels) if labels is not None else sorted(counts)
    thin = {label: counts.get(label, 0) for label in wanted if counts.get(label, 0) < min_per_class}
    if thin:
        listing = ", ".join(f"{label!r}: {n}" for label, n in sorted(thin.items(), key=lambda kv: kv[1]))
        raise TrainingDataError(
            f"{len(thin)} of {len(wanted)} classes have fewer than {min_per_class} examples after "
            f"dedupe ({listing}). File more mail into those category folders, or lower "
            "training.min_examples_per_class (a class with only a handful of examples cannot be "
            "learned or measured)"
        )
    if len(counts) < 2:
        raise TrainingDataError(
            f"found examples of only {sorted(counts)}; a classifier needs at least 2 categories"
        )


def split(
    examples: Sequence[Example], holdout_fraction: float, seed: int, *, name: str = "holdout"
) -> tuple[list[Example], list[Example]]:
    """(train, holdout): per class, the newest ``holdout_fraction`` (or a seeded random sample).

    Every class with at least 2 examples gets at least one example on each side. ``name`` only
    labels the log line (the trainer splits twice: holdout, then validation for early stopping).
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise TrainingDataError(f"holdout_fraction = {holdout_fraction!r}: expected a number between 0 and 1")
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    time_ordered = is_time_ordered(examples)
    rng = random.Random(seed)
    train: list[Example] = []
    holdout: list[Example] = []
    for label in sorted(by_label):
        # Sorting first makes the result independent of the order the source listed files in.
        group = sorted(by_label[label], key=lambda e: (e.key, content_hash(e.text)))
        if time_ordered:
            group.sort(key=lambda e: e.date or _EPOCH)  # stable: undated count as oldest -> train
        else:
            rng.shuffle(group)
        n = len(group)
        k = n_holdout(n, holdout_fraction)
        if time_ordered:
            train.extend(group[: n - k])
            holdout.extend(group[n - k:])
        else:
            holdout.extend(group[:k])
            train.extend(group[k:])
    log.info("data_split", part=name, mode="time-ordered" if time_ordered else "stratified random",
             kept=len(train), held_out=len(holdout))
    return train, holdout


def is_time_ordered(examples: Sequence[Example]) -> bool:
    """Whether ``split`` orders by date: enough examples carry one."""
    if not examples:
        return False
    dated = sum(1 for e in examples if e.date is not None)
    return dated / len(examples) >= DATED_FRACTION_FOR_TIME_SPLIT


def summary(examples: Sequence[Example], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Counts per class (in ``labels`` order when given) and the date range, JSON-ready."""
    counts = Counter(e.label for e in examples)
    order = list(labels) if labels is not None else sorted(counts)
    dates = [e.date for e in examples if e.date is not None]
    return {
        "n": len(examples),
        "per_class": {label: counts.get(label, 0) for label in order},
        "date_min": min(dates).isoformat() if dates else None,
        "date_max": max(dates).isoformat() if dates else None,
        "dated": len(dates),
    }


def n_holdout(n: int, fraction: float) -> int:
    """How many of a class of ``n`` go to the holdout (exposed for reports/tests)."""
    return 0 if n < 2 else min(n - 1, max(1, round(n * fraction)))


__all__ = [
    "check_min_examples",
    "content_hash",
    "dedupe",
    "is_time_ordered",
    "split",
    "summary",
    "n_holdout",
]

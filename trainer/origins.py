"""Where each harvested label came from: staff, a staff correction, or the daemon's own filing.

The retrain harvests the category folders, and the daemon files mail into those same folders. A
message it filed that nobody moved carries the daemon's guess, not a person's decision: training on
it teaches the model its own mistakes (and whatever mail was forged to be filed somewhere). So each
example is given an origin, and ``training.auto_filed`` says what happens to the daemon's:

- **correction**: staff put it where it is after the daemon decided otherwise: the corrections table
  holds (key, this label), or the daemon filed it as another label or sent it to the unsure folder
  (a correction the scan has not recorded yet is still one);
- **daemon**: the daemon filed this key as this label and no correction says otherwise;
- **staff**: the daemon never decided it (history, mail staff filed themselves).

``include`` trains on the daemon's filings, ``exclude`` leaves them out, ``after_days`` keeps those
filed at least ``days`` days ago (staff had that long to move them). Whatever the setting, daemon
filings never reach the holdout or the validation slice: those must be staff-labelled truth, or
the gate and the calibration would measure the model against its own answers.

Pure: examples, the daemon's filings, the corrections and the clock in; what to split, what to
train on only, and the counts out. The pipeline reads the state database (the edge).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mailtriage.core.training import AUTO_FILED_AFTER_DAYS, AUTO_FILED_EXCLUDE, AUTO_FILED_INCLUDE
from mailtriage_trainer.sources import Example

STAFF = "staff"
CORRECTION = "correction"
DAEMON = "daemon"
_DAY = 86400.0


@dataclass(frozen=True)
class Filing:
    """One decision of the daemon (the state database's latest row for a key)."""

    key: str
    label: str          # the category it chose (for an unsure message: its best guess)
    unsure: bool        # True: it went to the unsure folder, not into label's folder
    filed_at: float     # unix seconds


@dataclass(frozen=True)
class Policy:
    """``training.auto_filed`` and ``training.auto_filed_days``."""

    mode: str = AUTO_FILED_EXCLUDE
    days: int = 7

    def keeps(self, filing: Filing, now: float) -> bool:
        """Whether a daemon filing nobody moved becomes a training example."""
        if self.mode == AUTO_FILED_INCLUDE:
            return True
        if self.mode == AUTO_FILED_AFTER_DAYS:
            return now - filing.filed_at >= self.days * _DAY
        return False


@dataclass(frozen=True)
class Sorted:
    """The harvest by origin. ``truth`` (staff and corrections) is what may be held out;
    ``daemon`` is the daemon's filings the policy kept, for the training slice only."""

    truth: list[Example]
    daemon: list[Example]
    counts: dict[str, Any]   # the manifest's "origins" (see ``sort_examples``)


def origin_of(example: Example, filings: Mapping[str, Filing], corrected: set[tuple[str, str]]) -> str:
    """STAFF, CORRECTION or DAEMON for one harvested example (rules in the module docstring)."""
    if (example.key, example.label) in corrected:
        return CORRECTION
    filing = filings.get(example.key)
    if filing is None:
        return STAFF
    if filing.unsure or filing.label != example.label:
        return CORRECTION
    return DAEMON


def sort_examples(
    examples: Sequence[Example],
    filings: Iterable[Filing],
    corrections: Iterable[tuple[str, str]],
    policy: Policy,
    now: float,
) -> Sorted:
    """Give every example its origin and apply ``policy`` to the daemon's filings.

    ``filings``: the daemon's decisions (several for one key: the latest counts); ``corrections``:
    (key, actual label) pairs. ``counts``: {"staff", "corrections", "daemon" (filings kept),
    "daemon_skipped" (filings the policy left out), "auto_filed", "auto_filed_days"}.
    """
    latest: dict[str, Filing] = {}
    for f in filings:
        if f.key not in latest or f.filed_at >= latest[f.key].filed_at:
            latest[f.key] = f
    corrected = set(corrections)
    truth: list[Example] = []
    daemon: list[Example] = []
    staff = fixed = skipped = 0
    for ex in examples:
        origin = origin_of(ex, latest, corrected)
        if origin == DAEMON:
            if policy.keeps(latest[ex.key], now):
                daemon.append(ex)
            else:
                skipped += 1
            continue
        truth.append(ex)
        if origin == CORRECTION:
            fixed += 1
        else:
            staff += 1
    counts: dict[str, Any] = {"staff": staff, "corrections": fixed, "daemon": len(daemon), "daemon_skipped": skipped,
                              "auto_filed": policy.mode, "auto_filed_days": policy.days}
    return Sorted(truth, daemon, counts)


def unchecked(examples: Sequence[Example], policy: Policy, why: str) -> Sorted:
    """Every example counted as staff's, because there is no record of the daemon's decisions
    (``why`` says what is missing; the report and the log repeat it)."""
    counts: dict[str, Any] = {"staff": len(examples), "corrections": 0, "daemon": 0, "daemon_skipped": 0,
                              "auto_filed": policy.mode, "auto_filed_days": policy.days, "unchecked": why}
    return Sorted(list(examples), [], counts)


def describe_daemon(counts: Mapping[str, Any]) -> str:
    """The log's and the report's sentence on the daemon's filings, e.g. "148 filed by the daemon and
    left in place: included"."""
    kept, skipped = int(counts.get("daemon", 0)), int(counts.get("daemon_skipped", 0))
    total, mode, days = kept + skipped, counts.get("auto_filed"), counts.get("auto_filed_days")
    if counts.get("unchecked"):
        return f"the daemon's filings could not be told apart ({counts['unchecked']})"
    if not total:
        return "none filed by the daemon and left in place"
    head = f"{total} filed by the daemon and left in place"
    if mode == AUTO_FILED_INCLUDE:
        return f"{head}: included (training.auto_filed = \"include\")"
    if mode == AUTO_FILED_AFTER_DAYS:
        return (f"{head}: {kept} filed at least {days} days ago included, {skipped} newer left out "
                f"(training.auto_filed = \"after_days\")")
    return f"{head}: left out (training.auto_filed = \"exclude\")"


def describe(counts: Mapping[str, Any]) -> str:
    """All origins in one line, for the report."""
    if counts.get("unchecked"):
        return f"All {counts.get('staff', 0)} counted as sorted by staff: {describe_daemon(counts)}"
    return (f"{counts.get('staff', 0)} sorted by staff, {counts.get('corrections', 0)} staff corrections of the "
            f"daemon, {describe_daemon(counts)}")

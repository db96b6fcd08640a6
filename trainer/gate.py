"""The promotion gate: a new version becomes current only if its macro-F1 is not below the current
version's on the same held-out mail.

Kept apart from the run (pipeline.py) because it is the one rule an admin asks about when a retrain
did not go live; its answer (the manifest's "gate" entry) says why in words.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mailtriage.errors import ModelError

if TYPE_CHECKING:
    from mailtriage_trainer.pipeline import Settings

log = structlog.get_logger(__name__)

# The keys of the mail a version trained on (digests, one a line), so the next run's gate can
# compare on held-out mail the current version never saw.
TRAIN_KEYS_FILE = "train_keys.txt"


def key_digest(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "replace")).hexdigest()[:20]


def write_train_keys(version_dir: Path, examples: Sequence[Any]) -> None:
    (version_dir / TRAIN_KEYS_FILE).write_text(
        "".join(key_digest(e.key) + "\n" for e in sorted(examples, key=lambda e: e.key)), encoding="utf-8")


def gate(
    s: Settings, cfg: Any, labels: Sequence[str], holdout: Sequence[Any], served_probs: Any,
    new_metrics: dict[str, Any], force: bool, progress: bool,
) -> dict[str, Any]:
    """Promote only if the new macro-F1 >= the current version's on the same held-out mail.

    Both sides are scored as served: ``served_probs`` / ``new_metrics`` are the new version's served
    output, and the current version goes through load_classifier, which applies its ensemble if any.
    """
    from mailtriage.model import modeldir
    from mailtriage.core.labels import LabelSet

    assert s.model_dir is not None
    current = modeldir.current_version(s.model_dir)
    gate: dict[str, Any] = {"current_version": current.name if current else None, "new_macro_f1": new_metrics["macro_f1"]}

    def decide(promoted: bool, reason: str, decision: str | None = None) -> dict[str, Any]:
        if not promoted and force:
            promoted, decision, reason = True, "forced", reason + " Promoted anyway because of --force."
        gate.update(promoted=promoted, decision=decision or ("promoted" if promoted else "refused"), reason=reason)
        log.info("gate_decided", **{k: v for k, v in gate.items() if k != "current_metrics"})
        return gate

    if current is None:
        return decide(True, "No version was promoted before; this one becomes current.")
    try:
        current_labels = LabelSet.load(current).labels
    except ModelError as exc:
        return decide(True, f"The current version {current.name} cannot be read ({exc}); replacing it.")
    if set(current_labels) != set(labels):
        change = (f"labels {sorted(current_labels)} -> {sorted(labels)}")
        if cfg is not None:
            # The config names the categories the daemon serves; an old label set cannot be served anyway.
            return decide(True, f"The current version {current.name} has another label set ({change}) that no "
                                "longer matches the config; the two are not comparable, so the new one replaces it.")
        return decide(False, f"The current version {current.name} has another label set ({change}); without a "
                             "config saying which set is right, the gate keeps the current one. Pass --force to "
                             "replace it, or --config so the configured categories decide.")

    rows, note = _unseen_rows(current, holdout)
    subset = [holdout[i] for i in rows]
    try:
        current_metrics = score_version(current, s, labels, subset, progress)
    except ModelError as exc:
        return decide(True, f"The current version {current.name} cannot be loaded ({exc}); replacing it.")
    new_f1 = new_metrics["macro_f1"]
    if len(rows) != len(holdout):
        from mailtriage_trainer.evaluate import score_probs

        new_f1 = score_probs([e.label for e in subset], served_probs[rows], labels, ())["macro_f1"]
    cur_f1 = current_metrics["macro_f1"]
    gate.update(current_macro_f1=cur_f1, new_macro_f1_compared=new_f1, compared_on=len(subset),
                current_metrics=current_metrics)
    # A tiny tolerance so a re-run that reproduces the same model is not refused on float noise.
    if new_f1 >= cur_f1 - 1e-9:
        return decide(True, f"Macro-F1 {new_f1:.4f} >= current version {current.name}'s {cur_f1:.4f} on the "
                            f"same held-out mail.{note}")
    return decide(False, f"Macro-F1 {new_f1:.4f} < current version {current.name}'s {cur_f1:.4f} on the same "
                         f"held-out mail, so {current.name} stays current.{note} This version and its "
                         "report are kept; promote it with --force if that is intended.")


def _unseen_rows(current: Path, holdout: Sequence[Any]) -> tuple[list[int], str]:
    """The holdout rows to compare on, and a sentence for the reason when they are fewer than all.

    Compare on held-out mail the current version never trained on, when it says what it trained on.
    A current version trained on some of this holdout would score itself too well (a random split
    moves mail between train and holdout from one run to the next).
    """
    rows = list(range(len(holdout)))
    keys_file = current / TRAIN_KEYS_FILE
    if keys_file.is_file():
        seen = set(keys_file.read_text(encoding="utf-8").split())
        unseen = [i for i in rows if key_digest(holdout[i].key) not in seen]
        if len(unseen) < len(rows) and {holdout[i].label for i in unseen} == {e.label for e in holdout}:
            return unseen, (f" Compared on the {len(unseen)} of {len(holdout)} held-out messages that "
                            f"{current.name} did not train on.")
    return rows, ""


def score_version(path: Path, s: Settings, labels: Sequence[str], examples: Sequence[Any], progress: bool) -> dict[str, Any]:
    """A saved version's metrics on ``examples``, loaded as the daemon serves it."""
    from mailtriage_trainer.evaluate import DEFAULT_THRESHOLDS, classifier_probs, score_probs

    clf = s.load(path, labels)
    probs = classifier_probs(clf, [e.text for e in examples], labels, batch_size=max(s.params.batch_size, 32),
                             progress=progress)
    return score_probs([e.label for e in examples], probs, labels, (*DEFAULT_THRESHOLDS, s.threshold))

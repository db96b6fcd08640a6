"""Seeds for the web console's tests: decisions in a real state database (with explanations, envelopes
and corrections, as the daemon records them) and a model directory with versions and reports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from mailtriage.core import explain
from mailtriage.core.envelope import envelope_of
from mailtriage.core.labels import LabelSet
from mailtriage.core.mailtext import message_key
from mailtriage.core.routing import Decision
from mailtriage.model import modeldir
from mailtriage.store.state import Claim, Status, StateDB

LABELS = ("billing", "login", "refunds")
FOLDERS = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
UNSURE = "Support/Unsure"


def decide(state: StateDB, raw: bytes, uid: int, label: str, confidence: float, *, threshold: float = 0.6,
           account: str = "support", version: str = "20260101-000000") -> str:
    """Record ``raw`` as the IMAP watcher does: claimed, moved (to its category or the unsure
    folder), done, with its explanation and envelope. Returns the message key."""
    key = message_key(raw)
    unsure = confidence < threshold
    scores = {lab: (confidence if lab == label else (1 - confidence) / (len(LABELS) - 1)) for lab in LABELS}
    why = explain.explain(None, label, confidence, scores, threshold, unsure, version)
    decision = Decision(label, confidence, unsure, UNSURE if unsure else FOLDERS[label])
    state.record_envelope(key, envelope_of(raw))
    assert state.claim(account, "INBOX", 1, uid, key, decision, "move", version, explanation=why) == Claim.CLAIMED
    state.set_status(account, "INBOX", 1, uid, Status.DONE)
    return key


def make_version(model_dir: Path, name: str, *, f1: float, gate: str = "promoted", labels: tuple[str, ...] = LABELS,
                 confusion: bool = True) -> Path:
    """A complete version as the trainer leaves it, without weights (the console never loads one)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    v = model_dir / name
    v.mkdir()
    LabelSet(labels).save(v)
    manifest: dict[str, Any] = {
        "version": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "labels": list(labels),
        "metrics": {"macro_f1": f1, "accuracy": f1 + 0.01},
        "gate": {"decision": gate, "promoted": gate != "refused", "reason": f"macro-F1 {f1:.3f}"},
    }
    (v / modeldir.MANIFEST_FILE).write_text(json.dumps(manifest))
    (v / "report.md").write_text(f"# Version {name}\n\nmacro-F1 {f1:.3f}\n")
    if confusion:
        from mailtriage_trainer.report import plot_confusion

        plot_confusion([[8, 1, 1], [0, 9, 1], [1, 0, 9]], list(labels), v / "confusion.png", f"version {name}")
    return v


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)

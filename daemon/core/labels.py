"""The ordered label set saved with every adapter (labels.json), and its check against config."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mailtriage.errors import LabelMismatchError, ModelError

LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class LabelSet:
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ModelError(f"a label set needs at least 2 distinct labels, got {list(self.labels)}")

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def save(self, directory: str | Path) -> None:
        """Write labels.json 0600 whatever the umask (a model directory is private to its service user)."""
        fd = os.open(Path(directory, LABELS_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"labels": list(self.labels)}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> LabelSet:
        path = Path(directory, LABELS_FILE)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(tuple(data["labels"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{str(path)!r} is missing or unreadable; is this a mailtriage model directory?") from exc

    def check_matches(self, configured: Sequence[str], where: str = "the model") -> None:
        """Refuse an adapter whose labels differ from the configured categories (in any way but order)."""
        have, want = set(self.labels), set(configured)
        if have != want:
            raise LabelMismatchError(
                f"{where} was trained on labels {sorted(have)} but the config's [categories] are "
                f"{sorted(want)} (missing from model: {sorted(want - have)}, unknown to config: "
                f"{sorted(have - want)}). Retrain with mailtriage-train or fix [categories]."
            )

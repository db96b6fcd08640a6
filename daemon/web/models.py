"""The console's Models page: every version in the model directory with its gate result and report,
and promote / roll back, which is what `mailtriage-train promote VERSION` does.

File-system only (``model.modeldir``); the daemon notices ``current`` change and hot-reloads, so the
console never loads a model itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailtriage.core.labels import LabelSet
from mailtriage.errors import ModelError
from mailtriage.model import modeldir
from mailtriage.model.manifest import Manifest

# The trainer's report files (trainer/report.py); named here because the daemon never imports the trainer.
REPORT_FILE = "report.md"
CONFUSION_FILE = "confusion.png"
MAX_REPORT_BYTES = 256 * 1024


@dataclass(frozen=True)
class Version:
    name: str
    current: bool
    created: str | None
    macro_f1: float | None
    accuracy: float | None
    gate: str | None
    gate_reason: str | None
    serve: str | None
    has_report: bool
    has_confusion: bool
    problem: str | None  # why the manifest could not be read, if it could not


def list_versions(model_dir: Path) -> list[Version]:
    """Every complete version, newest first."""
    try:
        current = modeldir.current_version(model_dir)
    except ModelError:
        current = None
    out = []
    for v in reversed(modeldir.versions(model_dir)):
        is_current = current is not None and v.resolve() == current
        files = dict(has_report=(v / REPORT_FILE).is_file(), has_confusion=(v / CONFUSION_FILE).is_file())
        try:
            m = Manifest.load(v)
        except ModelError as exc:
            out.append(Version(v.name, is_current, None, None, None, None, None, None, problem=str(exc), **files))
            continue
        reason = m.gate.get("reason")
        out.append(Version(v.name, is_current, m.created, m.macro_f1, m.accuracy, m.gate_decision,
                           reason if isinstance(reason, str) else None, m.serve, problem=None, **files))
    return out


def promoted_at(model_dir: Path) -> float | None:
    """When ``current`` was last switched (promote replaces the link, so its own mtime is that moment)."""
    try:
        return (Path(model_dir) / modeldir.CURRENT).lstat().st_mtime
    except OSError:
        return None


def version_dir(model_dir: Path, name: str) -> Path:
    """The directory of version ``name``; ModelError unless it is a complete version listed there
    (so a name can never reach outside the model directory)."""
    known = {v.name: v for v in modeldir.versions(model_dir)}
    if name not in known:
        raise ModelError(f"no model version {name!r} in {str(model_dir)!r}; versions there: {sorted(known)[-10:]}")
    return known[name]


def report_text(model_dir: Path, name: str) -> str | None:
    path = version_dir(model_dir, name) / REPORT_FILE
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        return fh.read(MAX_REPORT_BYTES).decode("utf-8", errors="replace")


def confusion_png(model_dir: Path, name: str) -> bytes | None:
    path = version_dir(model_dir, name) / CONFUSION_FILE
    return path.read_bytes() if path.is_file() else None


def promote(model_dir: Path, name: str, labels: tuple[str, ...]) -> str | None:
    """Make ``name`` current (under the trainer's lock); returns the version it replaced."""
    target = version_dir(model_dir, name)
    LabelSet.load(target).check_matches(labels, where=f"version {name!r}")  # the daemon would refuse it
    with modeldir.exclusive(model_dir):
        try:
            before = modeldir.current_version(model_dir)
        except ModelError:
            before = None
        modeldir.promote(model_dir, target)
    return before.name if before is not None else None


def previous_version(model_dir: Path) -> str | None:
    """The version before the current one (what "roll back" promotes), or None."""
    versions = list_versions(model_dir)
    names = [v.name for v in versions]
    current = next((v.name for v in versions if v.current), None)
    if current is None:
        return None
    older = names[names.index(current) + 1 :]
    return older[0] if older else None

"""`mailtriage stats`: what the daemon decided, what staff corrected, and live accuracy per category.

Reads the state database only (safe while `serve` runs: WAL). Also says how many new labelled
examples the next retrain will see since the serving model was created.
"""

from __future__ import annotations

import calendar
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mailtriage.config import Config
from mailtriage.errors import ModelError

_CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_VERSION_FORMAT = "%Y%m%d-%H%M%S"


def model_created_at(config: Config) -> tuple[str | None, float | None]:
    """(version, creation time as unix seconds) of the model ``model.path`` resolves to, if known.

    From the manifest's ``created`` field, else the version name (a UTC timestamp), else the
    directory's mtime. (None, None) when no model is there.
    """
    from mailtriage.model import modeldir
    from mailtriage.model.manifest import Manifest

    try:
        version_dir = modeldir.resolve(Path(config.model.path))
    except Exception:  # noqa: BLE001 - stats still works without a model
        return None, None
    try:
        created = Manifest.load(version_dir).created
        if created is not None:
            return version_dir.name, float(calendar.timegm(time.strptime(created, _CREATED_FORMAT)))
    except (ModelError, ValueError):  # no manifest, an invalid one, or an unparsable time: fall back below
        pass
    try:
        return version_dir.name, float(calendar.timegm(time.strptime(version_dir.name[:15], _VERSION_FORMAT)))
    except ValueError:
        return version_dir.name, version_dir.stat().st_mtime


def next_retrain_examples(state: Any, since: float | None) -> dict[str, Any]:
    """New labelled examples since ``since`` (None: ever): distinct messages that are either

    - filed with a category by the daemon and left there (confirmed by staff not moving them),
    - corrected by staff into another category folder, or
    - sorted by staff out of the unsure folder into a category folder.
    """
    after = since if since is not None else float("-inf")
    corrections = [c for c in state.corrections() if c["corrected_at"] >= after]
    corrected_keys = {c["key"] for c in corrections if not c["was_unsure"]}
    from_unsure_keys = {c["key"] for c in corrections if c["was_unsure"]}
    filed_keys = {r.key for r in state.filed() if not r.unsure and r.decided_at >= after}
    confirmed = filed_keys - corrected_keys
    return {
        "since": since,
        "corrections": len(corrected_keys),
        "from_unsure": len(from_unsure_keys - corrected_keys),
        "filed_unchanged": len(confirmed),
        "total": len(filed_keys | corrected_keys | from_unsure_keys),
    }


def collect_stats(config: Config, window_days: int = 30) -> dict[str, Any]:
    """Everything `mailtriage stats` shows, as one JSON-able dict."""
    from mailtriage.store.state import StateDB

    exists = Path(config.state_path).exists()
    # A missing database means "nothing decided yet": report zeros. Never create or write files here:
    # stats runs as staff on a read-only copy or beside a running daemon.
    state = StateDB(config.state_path, readonly=True) if exists else StateDB(":memory:")
    try:
        stats = state.stats(window_days)
        version, created = model_created_at(config)
        stats["state_path"] = config.state_path
        stats["state_exists"] = exists
        stats["model"] = {
            "version": version,
            "created": time.strftime(_CREATED_FORMAT, time.gmtime(created)) if created is not None else None,
        }
        stats["next_retrain"] = next_retrain_examples(state, created)
        return stats
    finally:
        state.close()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  " + "  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths), file=out)


def render(stats: dict[str, Any], config: Config, out: TextIO) -> None:
    days = stats["window_days"]
    print(f"mailtriage stats: last {days} day(s), state {stats['state_path']}", file=out)
    if not stats["state_exists"]:
        print("  (no state database yet: the daemon has not decided anything)", file=out)
    model = stats["model"]
    print(f"  serving model: {model['version'] or '(none found at model.path)'}"
          + (f", created {model['created']}" if model["created"] else ""), file=out)
    print(file=out)

    totals = stats["totals"]
    print(f"Decisions: {totals['all']} (filed {totals['filed']}, unsure {totals['unsure']}, "
          f"dry run {totals['dry_run']}, failed {totals['failed']}, quarantined {totals.get('quarantined', 0)})",
          file=out)
    in_source = stats.get("in_source") or {}
    if in_source.get("retrying") or in_source.get("quarantine_pending"):
        # Say where these messages are: in no category or quarantine folder yet.
        print(f"  still in the watched mailbox: {in_source.get('retrying', 0)} refused, retried after a backoff "
              f"(then quarantined); quarantine pending {in_source.get('quarantine_pending', 0)} (the quarantine "
              "folder refused them too: retried after a backoff; check that folder on the server)", file=out)
    intakes = stats.get("intakes") or {}
    print(f"  by intake: IMAP watcher {intakes.get('imap', 0)}, SMTP content filter {intakes.get('smtp', 0)}, "
          f"milter {intakes.get('milter', 0)}", file=out)
    labels = list(config.labels) + sorted(str(k) for k in stats["decisions"] if k not in config.categories)
    rows = [["category", "filed", "unsure", "dry run", "failed", "corrected", "live accuracy"]]
    for label in labels:
        per = stats["decisions"].get(label, {})
        acc = stats["accuracy"].get(label, {})
        rows.append([
            str(label), str(per.get("filed", 0)), str(per.get("unsure", 0)), str(per.get("dry_run", 0)),
            str(per.get("failed", 0)), str(acc.get("corrected", 0)), _pct(acc.get("accuracy")),
        ])
    rows.append(["all", str(totals["filed"]), str(totals["unsure"]), str(totals["dry_run"]), str(totals["failed"]),
                 str(sum(a.get("corrected", 0) for a in stats["accuracy"].values())),
                 _pct(stats["overall_accuracy"])])
    _table(rows, out)
    print(file=out)

    corr = stats["corrections"]
    print(f"Corrections: {corr['total']} ({corr['from_unsure']} sorted out of the unsure folder)", file=out)
    pairs = sorted(corr["pairs"], key=lambda p: -p["n"])
    if pairs:
        rows = [["predicted", "actual", "from unsure", "count"]]
        rows += [[p["predicted"], p["actual"], "yes" if p["was_unsure"] else "no", str(p["n"])] for p in pairs]
        _table(rows, out)
    print(file=out)

    nxt = stats["next_retrain"]
    since = f"since {model['created']}" if model["created"] else "in total (no model yet)"
    print(f"Next retrain: {nxt['total']} new labelled example(s) {since}: {nxt['corrections']} correction(s), "
          f"{nxt['from_unsure']} sorted out of unsure, {nxt['filed_unchanged']} filed and left in place", file=out)


def print_stats(config: Config, window_days: int = 30, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """Print the stats as a table (or JSON with ``as_json``); returns the exit status (0)."""
    if window_days <= 0:
        from mailtriage.errors import ConfigError

        raise ConfigError(f"--days {window_days}: the window must be at least 1 day")
    stats = collect_stats(config, window_days)
    if as_json:
        print(json.dumps(stats, indent=2, sort_keys=True, default=str), file=out)
    else:
        render(stats, config, out)
    return 0


__all__ = ["collect_stats", "model_created_at", "next_retrain_examples", "print_stats"]

"""training.auto_filed against a real Dovecot and a real state database.

The daemon filed the newest mail of each category (some of it long ago, some yesterday, one message
through the SMTP filter); staff moved one filing elsewhere and sorted one unsure message. The retrain
must count each origin, keep or drop the daemon's filings as configured, never hold one out (the
time-ordered split would otherwise hold out exactly those, the newest) and say so in the report.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtriage.config import load_config
from mailtriage.core.mailtext import message_key
from mailtriage.core.routing import Decision
from mailtriage.model import modeldir
from mailtriage.store.state import StateDB
from mailtriage.testing.dovecot import load_messages
from mailtriage_trainer import cli, pipeline
from tests.models import TOY_EXAMPLES
from tests.test_train_cli import toy_message

pytestmark = pytest.mark.component

FOLDERS = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
DAY = 86400.0


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MAILTRIAGE_CONFIG", raising=False)
    monkeypatch.setattr("mailtriage_trainer.cli.DEFAULT_CONFIG", "/nonexistent/mailtriage.toml")
    yield


@pytest.fixture
def mailbox(tmp_path: Path, dovecot: Any, imap: Any, imap_user: tuple[str, str],
            monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The category folders on Dovecot, the state database, and the config naming both."""
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(TOY_EXAMPLES):
        by_label.setdefault(label, []).append(i)
    key = {i: message_key(toy_message(i, text)) for i, (text, _) in enumerate(TOY_EXAMPLES)}
    # The two newest of each category were filed by the daemon and left in place: one 10 days ago,
    # one yesterday: under a time-ordered split exactly these would be held out. The third newest login message it filed as billing; staff moved it (a correction).
    # The third newest refunds message went to the unsure folder; staff sorted it (a correction the scan
    # has not recorded yet).
    old = {by_label[label][-2] for label in FOLDERS}
    new = {by_label[label][-1] for label in FOLDERS}
    moved, sorted_unsure = by_label["login"][-3], by_label["refunds"][-3]
    for i, (text, label) in enumerate(TOY_EXAMPLES):
        load_messages(imap, FOLDERS[label], toy_message(i, text))

    state_path = tmp_path / "state.sqlite3"
    state = StateDB(state_path)
    uid = 0
    for i in sorted(old | new):
        label = TOY_EXAMPLES[i][1]
        decision = Decision(label, 0.9, False, FOLDERS[label])
        if i == by_label["billing"][-1]:  # the SMTP content filter's: its header had Sieve file it
            state.record_relayed(key[i], decision, "v1")
            continue
        uid += 1
        state.record_decision("support", "INBOX", 1, uid, key[i], decision, "move", "v1", False, "done")
    state.record_decision("support", "INBOX", 1, 100, key[moved], Decision("billing", 0.8, False, FOLDERS["billing"]),
                          "move", "v1", False, "done")
    state.record_correction(key[moved], "support", "billing", "login", False)
    state.record_decision("support", "INBOX", 1, 101, key[sorted_unsure],
                          Decision("billing", 0.3, True, "Support/Unsure"), "move", "v1", False, "done")
    state.close()
    with sqlite3.connect(state_path) as db:  # the clock the trainer judges ages by is the real one
        for i in old:
            db.execute("UPDATE messages SET decided_at = ? WHERE key = ?", (time.time() - 10 * DAY, key[i]))

    monkeypatch.setenv("MT_TEST_PASSWORD", imap_user[1])
    config = tmp_path / "config.toml"
    config.write_text(
        f'state_path = "{state_path}"\n'
        + "[categories]\n" + "".join(f'{k} = "{v}"\n' for k, v in FOLDERS.items())
        + "[[accounts]]\n"
        + f'name = "support"\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = "none"\n'
        + f'username = "{imap_user[0]}"\npassword_env = "MT_TEST_PASSWORD"\n'
        + "[training]\nmin_examples_per_class = 5\nholdout_fraction = 0.3\n"
    )
    return {"config": config, "old": {key[i] for i in old}, "new": {key[i] for i in new}}


# (--auto-filed, daemon filings trained on: "old" / "new" ones, how many left out)
SETTINGS = [("include", ("old", "new"), 0), ("exclude", (), 6), ("after_days", ("old",), 3)]


@pytest.mark.parametrize(("mode", "kept", "skipped"), SETTINGS)
def test_daemon_filings_are_counted_kept_or_dropped_per_setting_and_never_held_out(
    mailbox: dict[str, Any], capsys: pytest.CaptureFixture[str], mode: str, kept: tuple[str, ...], skipped: int,
) -> None:
    argv = ["--config", str(mailbox["config"]), "--auto-filed", mode]
    assert cli.main([*argv, "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected_kept = set().union(*(mailbox[k] for k in kept)) if kept else set()
    assert summary["origins"] == {"staff": 25, "corrections": 2, "daemon": len(expected_kept), "daemon_skipped": skipped,
                                  "auto_filed": mode, "auto_filed_days": 7}
    assert summary["data"]["all"]["n"] == 27 + len(expected_kept)

    cfg = load_config(mailbox["config"])
    data = pipeline.prepare(cli._settings(cli.build_train_parser().parse_args(argv), cfg), cfg, account=None)
    daemon = mailbox["old"] | mailbox["new"]
    assert not daemon & {e.key for e in data.holdout}, "a daemon filing was held out"
    assert not daemon & {e.key for e in data.val}, "a daemon filing was used for validation"
    assert daemon & {e.key for e in data.train} == expected_kept
    assert len(data.holdout) == 9  # 3 per category, all staff-labelled


def test_the_report_and_list_show_where_the_labels_came_from(
    mailbox: dict[str, Any], tiny_encoder_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    code = cli.main(["--config", str(mailbox["config"]), "--base", str(tiny_encoder_base), "--model-dir", str(models),
                     "--device", "cpu", "--batch-size", "8", "--lora-r", "8", "--max-length", "64", "--seed", "1",
                     "--auto-filed", "after_days", "--auto-filed-days", "5", "--epochs", "1", "--serve", "baseline"])
    assert code in (cli.EXIT_PROMOTED, cli.EXIT_NOT_PROMOTED)
    (version,) = modeldir.versions(models)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["origins"] == {"staff": 25, "corrections": 2, "daemon": 3, "daemon_skipped": 3,
                                   "auto_filed": "after_days", "auto_filed_days": 5}
    report = (version / "report.md").read_text()
    assert ("25 sorted by staff, 2 staff corrections of the daemon, 6 filed by the daemon and left in place: "
            "3 filed at least 5 days ago included, 3 newer left out") in report
    capsys.readouterr()
    assert cli.main(["list", "--model-dir", str(models)]) == 0
    assert "25/2/3 (+3 skipped)" in capsys.readouterr().out

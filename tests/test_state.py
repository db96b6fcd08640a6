"""StateDB: the keys that make restarts, renumbering and duplicates safe, and the stats it reports."""

from __future__ import annotations

import threading
import time
from typing import Any
from pathlib import Path

import pytest

from mailtriage.core.explain import Explanation
from mailtriage.core.routing import Decision
from mailtriage.store.state import SCHEMA_VERSION, FiledRow, StateDB


BILLING = Decision("billing", 0.9, False, "Support/Billing")
UNSURE = Decision("login", 0.3, True, "Support/Unsure")


@pytest.fixture
def db(tmp_path: Path) -> StateDB:
    return StateDB(tmp_path / "state.sqlite3")


def _record(db: StateDB, uid: int, key: str, decision: Decision = BILLING, status: str = "done", *,
            dry_run: bool = False, account: str = "acct", uidvalidity: int = 7, action: str = "move") -> None:
    db.record_decision(account, "INBOX", uidvalidity, uid, key, decision, action, "v1", dry_run, status)


@pytest.mark.pure
def test_schema_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.sqlite3"
    db = StateDB(path)
    _record(db, 1, "<a@x>")
    db.close()
    again = StateDB(path)
    assert again.is_done("acct", "<a@x>")
    assert again._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.pure
def test_pending_then_done_lifecycle(db: StateDB) -> None:
    _record(db, 5, "<a@x>", status="pending")
    assert not db.is_done("acct", "<a@x>")
    assert [r.uid for r in db.pending("acct", "INBOX")] == [5]
    db.set_status("acct", "INBOX", 7, 5, "done")
    assert db.pending("acct", "INBOX") == []
    assert db.is_done("acct", "<a@x>")
    assert db.handled_uids("acct", "INBOX", 7, [4, 5, 6]) == {5}


def _claim(db: StateDB, uid: int, key: str, content: str | None = "c1", *, account: str = "acct",
           uidvalidity: int = 7, mailbox: str = "INBOX") -> str:
    return db.claim(account, mailbox, uidvalidity, uid, key, BILLING, "move", "v1", content=content)


@pytest.mark.pure
def test_claim_by_uid_and_by_key_and_content(db: StateDB) -> None:
    assert _claim(db, 1, "<a@x>") == "claimed"
    assert [r.status for r in db.pending("acct", "INBOX")] == ["pending"]
    assert _claim(db, 1, "<a@x>") == "taken"  # another worker has this UID
    db.set_status("acct", "INBOX", 7, 1, "done")
    assert _claim(db, 1, "<a@x>") == "taken"
    # Renumbered (UIDVALIDITY change), re-delivered or in another mailbox: the same message is a duplicate.
    assert _claim(db, 1, "<a@x>", uidvalidity=8) == "duplicate"
    assert _claim(db, 99, "<a@x>", mailbox="Other") == "duplicate"
    assert db.get("acct", "Other", 7, 99).status == "skipped"  # type: ignore[union-attr]
    # A different message reusing the Message-ID is claimed (filed), not skipped.
    assert _claim(db, 2, "<a@x>", "c2") == "claimed"
    assert db.is_done("acct", "<a@x>", "c1") and not db.is_done("acct", "<a@x>", "c3")
    # Keys are per account.
    assert _claim(db, 1, "<a@x>", account="other") == "claimed"


@pytest.mark.component  # forks; SIGKILL
def test_two_processes_racing_for_the_same_messages_claim_each_once(tmp_path: Path) -> None:
    """Two workers (separate processes, separate connections to one file) claim
    the same 300 messages at once, one under the same UIDs, one under other UIDs (the same message
    in two mailboxes): each message is claimed exactly once; the loser sees 'taken' or 'duplicate'."""
    path = tmp_path / "state.sqlite3"
    StateDB(path).close()
    got = _together(_claim_all, [(str(path), mbox) for mbox in ("INBOX", "INBOX", "Other")])
    claimed = [uid for side in got for uid in side]
    assert sorted(claimed) == list(range(300)), "each message claimed exactly once"
    rows = StateDB(path).rows("acct")
    assert sorted(r.status for r in rows) == ["pending"] * 300 + ["skipped"] * 300


def _together(target: Any, args: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``target(*a, start, results)`` in one forked process per ``a``, released at the same moment;
    what each put on ``results``, in the order they finished."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=target, args=(*a, start, results)) for a in args]
    for w in workers:
        w.start()
    start.set()
    got = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    return got


def _claim_all(path: str, mailbox: str, start: object, results: object) -> None:
    db = StateDB(path)
    start.wait()  # type: ignore[attr-defined]
    mine = [uid for uid in range(300) if _claim(db, uid, f"<{uid}@x>", mailbox=mailbox) == "claimed"]
    results.put(mine)  # type: ignore[attr-defined]


@pytest.mark.component  # forks
def test_processes_starting_at_once_on_a_new_file_all_open_it(tmp_path: Path) -> None:
    """Two `serve` (or a CLI beside the daemon) starting at the same moment on a state file that
    does not exist yet: each must open it. A schema created statement by statement let a second
    process see tables without a version and refuse the file as foreign; the WAL switch answered
    "database is locked" at once. Twenty rounds of four processes: before the fix most rounds failed."""
    for round_ in range(20):
        path = tmp_path / f"state-{round_}.sqlite3"
        got = _together(_open_at_once, [(str(path),)] * 4)
        assert got == ["ok"] * 4, got
        assert StateDB(path, readonly=True).rows("acct") == []


def _open_at_once(path: str, start: object, results: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    try:
        StateDB(path)
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # the test prints what went wrong
        results.put(repr(exc))  # type: ignore[attr-defined]


@pytest.mark.component  # forks; SIGKILL
def test_the_mailbox_lock_is_exclusive_and_dies_with_its_process(tmp_path: Path) -> None:
    import os
    import signal

    path = tmp_path / "state.sqlite3"
    db = StateDB(path)
    release = db.lock_mailbox("acct", "INBOX")
    assert release is not None
    assert StateDB(path).lock_mailbox("acct", "INBOX") is None  # another worker, even in this process
    other = db.lock_mailbox("acct", "Other")
    assert other is not None
    release()
    again = StateDB(path).lock_mailbox("acct", "INBOX")
    assert again is not None
    again()
    pid = os.fork()
    if pid == 0:  # a child takes the lock and is SIGKILLed holding it
        StateDB(path).lock_mailbox("acct", "INBOX")
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    after = db.lock_mailbox("acct", "INBOX")
    assert after is not None
    after()
    other()


@pytest.mark.pure
def test_a_quarantine_a_version_3_database_gave_up_on_is_retried(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "v3.sqlite3"
    db = StateDB(path)
    _claim(db, 1, "<q@x>")
    db.set_quarantine("acct", "INBOX", 7, 1, "Quarantine", None, None)
    db.fail_attempt("acct", "INBOX", 7, 1, "quarantine refused", None)  # what version 3 did: never again
    db.close()
    with sqlite3.connect(path) as conn:  # what version 3 wrote: no origin column
        conn.execute("DROP INDEX messages_origin_key")
        conn.execute("DROP INDEX messages_origin_uid")
        conn.execute("ALTER TABLE messages DROP COLUMN origin")
        conn.execute("ALTER TABLE messages DROP COLUMN explanation")
        conn.execute("PRAGMA user_version=3")
    assert StateDB(path, readonly=True).stats()["totals"]["quarantined"] == 0  # not in that folder
    migrated = StateDB(path)
    assert [(r.uid, r.quarantined) for r in migrated.due_retries("acct", "INBOX", 7)] == [(1, True)]


@pytest.mark.pure
def test_a_version_1_database_is_migrated_and_stats_reads_it_unchanged(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "v1.sqlite3"
    db = StateDB(path)
    _record(db, 1, "<a@x>")
    db.close()
    with sqlite3.connect(path) as conn:  # what version 1 wrote: none of the later columns
        conn.execute("DROP INDEX messages_origin_key")
        conn.execute("DROP INDEX messages_origin_uid")
        for column in ("content", "attempts", "retry_at", "quarantined", "origin", "explanation"):
            conn.execute(f"ALTER TABLE messages DROP COLUMN {column}")
        conn.execute("UPDATE messages SET status='failed'")  # a refused action version 1 gave up on
        conn.execute("PRAGMA user_version=1")
    before = path.read_bytes()
    assert StateDB(path, readonly=True).stats()["totals"]["failed"] == 1
    assert path.read_bytes() == before
    migrated = StateDB(path)
    assert migrated._conn().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    assert [r.uid for r in migrated.due_retries("acct", "INBOX", 7)] == [1]  # no longer stranded
    migrated.set_status("acct", "INBOX", 7, 1, "done")
    assert migrated.is_done("acct", "<a@x>", "any content")  # an old row matches by key alone
    assert _claim(migrated, 2, "<a@x>", "c9") == "duplicate"
    assert [r.content for r in migrated.rows("acct")] == [None, "c9"]


def _why(label: str = "billing") -> Explanation:
    return Explanation(label=label, confidence=0.9, top=((label, 0.9),), threshold=0.6, unsure=False, version="v1",
                       part="baseline", weight=None, terms=None)


@pytest.mark.pure
def test_every_kind_of_decision_row_keeps_its_explanation(db: StateDB) -> None:
    db.claim("acct", "INBOX", 7, 1, "<a@x>", BILLING, "move", "v1", content="c1", explanation=_why())
    db.record_decision("acct", "INBOX", 7, 2, "<b@x>", UNSURE, "move", "v1", True, "done", explanation=_why("login"))
    db.record_relayed("<c@x>", BILLING, "v1", explanation=_why())
    db.record_relayed("<d@x>", BILLING, "v1", intake="milter", explanation=_why())
    rows = {r.key: r for r in db.rows()}
    assert {k: Explanation.from_json(r.explanation).label for k, r in rows.items() if r.explanation} == {
        "<a@x>": "billing", "<b@x>": "login", "<c@x>": "billing", "<d@x>": "billing"}
    db.set_status("acct", "INBOX", 7, 1, "done")  # finishing the action keeps it
    _record(db, 2, "<b@x>", UNSURE)  # a later update without one keeps the first
    kept = [db.get("acct", "INBOX", 7, uid) for uid in (1, 2)]
    assert [Explanation.from_json(r.explanation).label for r in kept if r and r.explanation] == ["billing", "login"]


@pytest.mark.pure
def test_a_version_4_database_gains_the_explanation_column_and_stats_reads_it_unchanged(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "v4.sqlite3"
    db = StateDB(path)
    _record(db, 1, "<a@x>")
    db.close()
    with sqlite3.connect(path) as conn:  # what version 4 wrote: no explanation column
        conn.execute("ALTER TABLE messages DROP COLUMN explanation")
        conn.execute("PRAGMA user_version=4")
    before = path.read_bytes()
    old = StateDB(path, readonly=True)
    assert old.stats()["totals"]["filed"] == 1
    assert [r.explanation for r in old.rows()] == [None]
    assert path.read_bytes() == before
    migrated = StateDB(path)
    assert migrated._conn().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    migrated.record_relayed("<b@x>", BILLING, "v1", explanation=_why())
    assert [r.explanation is not None for r in migrated.rows()] == [False, True]
    assert migrated.stats()["totals"]["filed"] == 2


@pytest.mark.pure
def test_retry_bookkeeping(db: StateDB) -> None:
    assert _claim(db, 1, "<a@x>") == "claimed"
    assert db.fail_attempt("acct", "INBOX", 7, 1, "refused", time.time() + 60) == 1
    assert db.due_retries("acct", "INBOX", 7) == [] and db.next_retry_at("acct", "INBOX") is not None
    assert db.fail_attempt("acct", "INBOX", 7, 1, "refused again", 0.0) == 2
    assert [r.attempts for r in db.due_retries("acct", "INBOX", 7)] == [2]
    assert db.take_retry("acct", "INBOX", 7, 1) and not db.take_retry("acct", "INBOX", 7, 1)  # one taker
    assert db.get("acct", "INBOX", 7, 1).status == "pending"  # type: ignore[union-attr]
    db.set_quarantine("acct", "INBOX", 7, 1, "Quarantine", 5, 10)
    db.set_status("acct", "INBOX", 7, 1, "done")
    assert db.stats()["totals"]["quarantined"] == 1 and db.stats()["totals"]["filed"] == 0


@pytest.mark.pure
def test_failed_is_not_done_but_is_handled(db: StateDB) -> None:
    _record(db, 3, "<f@x>", status="failed")
    assert not db.is_done("acct", "<f@x>")
    assert db.handled_uids("acct", "INBOX", 7, [3]) == {3}


@pytest.mark.pure
def test_dry_run_does_not_count_for_real_mode(db: StateDB) -> None:
    _record(db, 1, "<d@x>", dry_run=True)
    assert db.is_done("acct", "<d@x>", dry_run=True)
    assert not db.is_done("acct", "<d@x>")
    assert db.handled_uids("acct", "INBOX", 7, [1]) == set()
    assert db.handled_uids("acct", "INBOX", 7, [1], dry_run=True) == {1}
    _record(db, 2, "<r@x>")
    assert db.is_done("acct", "<r@x>", dry_run=True)  # a real decision also holds for dry runs


@pytest.mark.pure
def test_last_uid_cursor(db: StateDB) -> None:
    assert db.last_uid("acct", "INBOX", 7) == 0
    db.set_last_uid("acct", "INBOX", 7, 10)
    db.set_last_uid("acct", "INBOX", 7, 4)  # never backwards
    assert db.last_uid("acct", "INBOX", 7) == 10
    assert db.last_uid("acct", "INBOX", 8) == 0  # another UIDVALIDITY: start again
    db.set_last_uid("acct", "INBOX", 8, 2)
    assert db.last_uid("acct", "INBOX", 8) == 2
    assert db.stored_uidvalidity("acct", "INBOX") == 8
    # The dry-run cursor is separate.
    assert db.last_uid("acct", "INBOX", 8, dry_run=True) == 0


@pytest.mark.pure
def test_record_skip_never_overwrites(db: StateDB) -> None:
    _record(db, 1, "<a@x>")
    db.record_skip("acct", "INBOX", 7, 1, "<a@x>", "already decided")
    assert db.get("acct", "INBOX", 7, 1).status == "done"  # type: ignore[union-attr]
    db.record_skip("acct", "INBOX", 7, 2, "<a@x>", "already decided")
    assert db.get("acct", "INBOX", 7, 2).status == "skipped"  # type: ignore[union-attr]
    assert len(db.filed()) == 1


@pytest.mark.pure
def test_filed_lists_real_done_decisions_once_per_key(db: StateDB) -> None:
    _record(db, 1, "<a@x>")
    _record(db, 2, "<b@x>", UNSURE)
    _record(db, 3, "<c@x>", dry_run=True)
    _record(db, 4, "<d@x>", status="failed")
    _record(db, 5, "<e@x>", status="pending")
    _record(db, 6, "<z@x>", account="other")
    rows = db.filed("acct")
    assert [r.key for r in rows] == ["<a@x>", "<b@x>"]
    assert rows[0] == FiledRow("<a@x>", "billing", False, "Support/Billing", "acct", rows[0].decided_at, "v1")
    assert rows[1].unsure and rows[1].label == "login"
    assert {r.account for r in db.filed()} == {"acct", "other"}


@pytest.mark.pure
def test_record_correction_is_idempotent(db: StateDB) -> None:
    assert db.record_correction("<a@x>", "acct", "billing", "login", False)
    assert not db.record_correction("<a@x>", "acct", "billing", "login", False)
    assert db.record_correction("<a@x>", "acct", "billing", "refunds", False)
    assert len(db.corrections()) == 2


@pytest.mark.pure
def test_stats_outcomes_and_live_accuracy(db: StateDB) -> None:
    for uid in range(1, 5):
        _record(db, uid, f"<b{uid}@x>")                        # 4 filed billing
    _record(db, 10, "<u@x>", UNSURE)                           # 1 unsure
    _record(db, 11, "<d@x>", dry_run=True)                     # 1 dry run
    _record(db, 12, "<f@x>", status="failed")                  # 1 failed
    _record(db, 13, "<p@x>", status="pending")                 # not counted
    db.record_correction("<b1@x>", "acct", "billing", "login", False)
    db.record_correction("<u@x>", "acct", "login", "refunds", True)
    s = db.stats(30)
    assert s["decisions"]["billing"] == {"filed": 4, "unsure": 0, "dry_run": 1, "failed": 1, "quarantined": 0,
                                          "quarantine_pending": 0}
    assert s["decisions"]["login"]["unsure"] == 1
    assert s["totals"] == {"filed": 4, "unsure": 1, "dry_run": 1, "failed": 1, "quarantined": 0, "quarantine_pending": 0,
                           "all": 7}
    assert s["corrections"]["total"] == 2 and s["corrections"]["from_unsure"] == 1
    assert s["accuracy"]["billing"] == {"filed": 4, "corrected": 1, "accuracy": 0.75}
    assert s["overall_accuracy"] == 0.75
    # Outside the window nothing counts.
    later = db.stats(1, now=time.time() + 3 * 86400)
    assert later["totals"]["all"] == 0 and later["overall_accuracy"] is None


@pytest.mark.pure
def test_threads_each_get_a_connection(db: StateDB) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for uid in range(50):
                db.record_decision(f"a{n}", "INBOX", 1, uid, f"<{n}-{uid}@x>", BILLING, "move", "v1", False, "done")
            db.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(db.rows()) == 200


@pytest.mark.pure
def test_bad_status_is_refused(db: StateDB) -> None:
    with pytest.raises(ValueError):
        _record(db, 1, "<a@x>", status="moved")


@pytest.mark.pure
def test_state_dir_and_db_are_private(tmp_path: Path) -> None:
    """A new state directory is 0700, the database (and its WAL files) 0600,
    whatever the umask; an existing directory keeps the mode the admin gave it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        db = StateDB(tmp_path / "var" / "state" / "state.sqlite3")
        db._exec("CREATE TABLE IF NOT EXISTS probe (x)")
        db._exec("INSERT INTO probe VALUES (1)")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "var") == 0o700 and mode(tmp_path / "var" / "state") == 0o700
    files = sorted((tmp_path / "var" / "state").iterdir())
    assert any(f.name.endswith("-wal") for f in files), files
    for f in files:
        assert mode(f) == 0o600, (f, oct(mode(f)))
    db.close()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    StateDB(shared / "s.sqlite3").close()
    assert mode(shared) == 0o755 and mode(shared / "s.sqlite3") == 0o600

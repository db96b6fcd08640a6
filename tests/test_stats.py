"""`mailtriage stats` reads the state database without writing it, and every
opener checks the schema version.

The read-only cases run the stats in a forked child that cannot write: as root the child becomes
`nobody` (root ignores file modes), otherwise the modes alone stop it.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailtriage.config import Config
from mailtriage.core.routing import Decision
from mailtriage.errors import StateError
from mailtriage.store.state import SCHEMA_VERSION, StateDB
from mailtriage.store.stats import print_stats
from mailtriage.testing.builders import make_config

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login"}


def _config(state_path: Path, tmp_path: Path) -> Config:
    return make_config(categories=CATEGORIES, state_path=str(state_path), model={"path": str(tmp_path / "none")})


def _fill(state: StateDB) -> None:
    state.record_decision("support", "INBOX", 1, 1, "<a@x>", Decision("billing", 0.9, False, "Support/Billing"),
                          "move", "v1", False, "done")
    state.record_decision("support", "INBOX", 1, 2, "<b@x>", Decision("login", 0.3, True, "Support/Unsure"),
                          "move", "v1", False, "done")


def _warm_up() -> None:
    # The child as `nobody` cannot read this Python's library (under /root): import everything the
    # stats use by running them once, in the parent, on a throwaway database.
    with tempfile.TemporaryDirectory() as scratch:
        StateDB(Path(scratch) / "s.db").close()
        _stats_json(_config(Path(scratch) / "s.db", Path(scratch)))()


def _in_unprivileged_child(fn: Callable[[], str]) -> tuple[int, str]:
    """Run ``fn`` in a forked child as a user that cannot write the files; (exit status, its output)."""
    _warm_up()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read_fd)
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out, status = f"{type(exc).__name__}: {exc}", 1
        os.write(write_fd, out.encode())
        os.close(write_fd)
        os._exit(status)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), b"".join(chunks).decode()


def _stats_json(config: Config) -> Callable[[], str]:
    def run() -> str:
        out = io.StringIO()
        print_stats(config, as_json=True, out=out)
        return out.getvalue()

    return run


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A temporary directory the unprivileged child can reach (pytest's tmp_path is under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="mailtriage-stats-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for sub in path.rglob("*"):
            if sub.is_dir():
                os.chmod(sub, 0o755)
        shutil.rmtree(path)


def _listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.component
def test_stats_on_a_read_only_database_and_directory(open_dir: Path) -> None:
    tmp_path = open_dir
    state_dir = tmp_path / "state"
    path = state_dir / "state.sqlite3"
    state = StateDB(path)
    _fill(state)
    state.close()  # the last connection gone: no -wal/-shm, as after a clean daemon stop
    os.chmod(path, 0o444)
    os.chmod(state_dir, 0o555)
    before = _listing(state_dir)
    try:
        code, out = _in_unprivileged_child(_stats_json(_config(path, tmp_path)))
        assert code == 0, out  # before the fix: "attempt to write a readonly database"
        data = json.loads(out)
        assert data["totals"]["filed"] == 1 and data["totals"]["unsure"] == 1
        assert _listing(state_dir) == before  # not a byte written, no -wal/-shm/journal created
    finally:
        os.chmod(state_dir, 0o755)


@pytest.mark.component
def test_stats_beside_a_running_daemon_reads_its_wal(open_dir: Path) -> None:
    tmp_path = open_dir
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    path = state_dir / "state.sqlite3"
    path.touch(mode=0o644)  # readable by staff; SQLite gives -wal/-shm the same mode
    os.chmod(path, 0o644)
    daemon = StateDB(path)  # stays open, as the running daemon's connection
    _fill(daemon)
    assert Path(f"{path}-wal").exists()
    os.chmod(state_dir, 0o555)
    try:
        code, out = _in_unprivileged_child(_stats_json(_config(path, tmp_path)))
        assert code == 0, out
        data = json.loads(out)
        assert data["totals"]["filed"] == 1 and data["totals"]["unsure"] == 1  # rows still only in the WAL
    finally:
        os.chmod(state_dir, 0o755)
        daemon.close()


@pytest.mark.pure
def test_a_newer_schema_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateDB(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    for readonly in (False, True):
        with pytest.raises(StateError, match=rf"schema version {SCHEMA_VERSION + 1}, written by a newer mailtriage"):
            StateDB(path, readonly=readonly)
    with pytest.raises(StateError, match="newer mailtriage"):
        print_stats(_config(path, tmp_path), out=io.StringIO())


@pytest.mark.pure
def test_an_unversioned_or_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something (x)")
    with pytest.raises(StateError, match="not a mailtriage state database"):
        StateDB(path)
    # Older versions are migrated (tests/test_state.py); a newer one, or one with no migration, is refused.
    newer = tmp_path / "newer.sqlite3"
    StateDB(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StateError, match="written by a newer mailtriage"):
        StateDB(newer)
    with pytest.raises(StateError, match="written by a newer mailtriage"):
        StateDB(newer, readonly=True)
    unknown = tmp_path / "unknown.sqlite3"
    StateDB(unknown).close()
    with sqlite3.connect(unknown) as conn:
        conn.execute("PRAGMA user_version=-5")
    with pytest.raises(StateError, match="no migration from it"):
        StateDB(unknown)


@pytest.mark.pure
def test_a_new_database_gets_the_current_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    StateDB(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    with pytest.raises(StateError, match="is empty"):
        StateDB(empty, readonly=True)

"""`mailtriage check` against a real Dovecot: the OK case and each failure an admin meets first."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import pytest

from mailtriage.cli.check import run_check
from mailtriage.config import AccountConfig, Config, ModelConfig
from mailtriage.testing.dovecot import imap_capability_without

pytestmark = pytest.mark.component

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
UNSURE = "Support/Unsure"


def _config(tmp_path: Path, host: str, port: int, user: str, password: str, **account: Any) -> Config:
    pw = tmp_path / "imap-password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    acc = AccountConfig(
        name="support", host=host, port=port, tls="none", username=user, password_file=str(pw), **account
    )
    return Config(
        categories=CATEGORIES,
        unsure_folder=UNSURE,
        state_path=str(tmp_path / "state" / "state.sqlite3"),
        accounts=(acc,),
        model=ModelConfig(path=str(tmp_path / "no-model")),
    )


def _run(config: Config, **kwargs: Any) -> tuple[int, list[str]]:
    out = io.StringIO()
    rc = run_check(config, out=out, **kwargs)
    return rc, out.getvalue().splitlines()


def _line(lines: list[str], needle: str) -> str:
    found = [line for line in lines if needle in line]
    assert found, f"no line with {needle!r} in:\n" + "\n".join(lines)
    return found[0]


def _make_folders(dovecot: Any, user: str, password: str) -> None:
    client = dovecot.client(user, password)
    try:
        for folder in (*CATEGORIES.values(), UNSURE):
            client.create_folder(folder)
    finally:
        client.logout()


def test_all_ok(dovecot: Any, imap_user: tuple[str, str], tmp_path: Path) -> None:
    user, password = imap_user
    _make_folders(dovecot, user, password)
    rc, lines = _run(_config(tmp_path, dovecot.host, dovecot.port, user, password), check_model=False)
    assert rc == 0, "\n".join(lines)
    assert _line(lines, "connect").startswith("OK")
    assert _line(lines, "IDLE").startswith("OK")
    assert _line(lines, "MOVE").startswith("OK")
    assert _line(lines, "'Support/Billing'").startswith("OK")
    assert _line(lines, "watched mailbox 'INBOX'").startswith("OK")
    assert _line(lines, "state directory").startswith("OK")
    assert not any(line.startswith("FAIL") for line in lines)


def test_wrong_password_fails_with_hint(dovecot: Any, imap_user: tuple[str, str], tmp_path: Path) -> None:
    user, _password = imap_user
    rc, lines = _run(_config(tmp_path, dovecot.host, dovecot.port, user, "wrong"), check_model=False)
    assert rc == 1
    line = _line(lines, "connect")
    assert line.startswith("FAIL")
    assert "password_file" in line  # says which secret to check


def test_unreachable_port_fails(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc, lines = _run(_config(tmp_path, "127.0.0.1", port, "u", "p"), check_model=False)
    assert rc == 1
    line = _line(lines, "connect")
    assert line.startswith("FAIL") and f"127.0.0.1:{port}" in line


def test_missing_folder_then_create_folders_fixes_it(dovecot: Any, imap_user: tuple[str, str], tmp_path: Path) -> None:
    user, password = imap_user
    config = _config(tmp_path, dovecot.host, dovecot.port, user, password)
    rc, lines = _run(config, check_model=False)
    assert rc == 1
    line = _line(lines, "'Support/Refunds'")
    assert line.startswith("FAIL") and "--create-folders" in line

    rc, lines = _run(config, create_folders=True, check_model=False)
    assert rc == 0, "\n".join(lines)
    assert "created" in _line(lines, "'Support/Refunds'")
    client = dovecot.client(user, password)
    try:
        assert all(client.folder_exists(f) for f in (*CATEGORIES.values(), UNSURE))
    finally:
        client.logout()
    rc, lines = _run(config, check_model=False)
    assert rc == 0 and "was missing" not in "\n".join(lines)


def test_missing_watched_mailbox_fails(dovecot: Any, imap_user: tuple[str, str], tmp_path: Path) -> None:
    user, password = imap_user
    _make_folders(dovecot, user, password)
    config = _config(tmp_path, dovecot.host, dovecot.port, user, password, mailboxes=("INBOX", "Support/New"))
    rc, lines = _run(config, create_folders=True, check_model=False)
    assert rc == 1
    assert _line(lines, "watched mailbox 'Support/New'").startswith("FAIL")


def test_no_idle_no_move_are_warnings(dovecot_factory: Any, tmp_path: Path) -> None:
    server = dovecot_factory(extra_conf=imap_capability_without("IDLE", "MOVE"), users={"support": "secret"})
    _make_folders(server, "support", "secret")
    rc, lines = _run(_config(tmp_path, server.host, server.port, "support", "secret"), check_model=False)
    assert rc == 0, "\n".join(lines)
    assert _line(lines, "IDLE").startswith("WARN") and "poll" in _line(lines, "IDLE")
    assert _line(lines, "MOVE").startswith("WARN") and "UIDPLUS" in _line(lines, "MOVE")


def test_unwritable_state_dir_fails(tmp_path: Path) -> None:
    import dataclasses
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    config = dataclasses.replace(
        _config(tmp_path, "127.0.0.1", 1, "u", "p"), accounts=(), state_path=str(locked / "sub" / "s.db")
    )
    rc, lines = _run(config, check_model=False)
    assert rc == 1 and _line(lines, "state directory").startswith("FAIL")


def test_model_ok_and_label_mismatch(tiny_model_dir: Path, tmp_path: Path) -> None:
    import dataclasses

    base = _config(tmp_path, "127.0.0.1", 1, "u", "p")
    config = dataclasses.replace(base, accounts=(), model=ModelConfig(path=str(tiny_model_dir), device="cpu"))
    rc, lines = _run(config)
    assert rc == 0, "\n".join(lines)
    assert _line(lines, " model '").startswith("OK") and "labels match" in _line(lines, " model '")

    mismatched = dataclasses.replace(config, categories={**CATEGORIES, "shipping": "Support/Shipping"})
    rc, lines = _run(mismatched)
    assert rc == 1
    line = _line(lines, " model '")
    assert line.startswith("FAIL") and "LabelMismatchError" in line and "shipping" in line

    missing = dataclasses.replace(config, model=ModelConfig(path=str(tmp_path / "nowhere")))
    rc, lines = _run(missing)
    assert rc == 1 and "does not exist" in _line(lines, " model '")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_exposed_password_file_and_clear_text_are_reported(tmp_path: Path) -> None:
    """Others reading the password file FAILs, its group reading it WARNs;
    tls = "none" and verify_tls = false are counted as warnings."""
    import dataclasses

    config = _config(tmp_path, "127.0.0.1", _closed_port(), "u", "p")
    pw = Path(config.accounts[0].password_file or "")
    _rc, lines = _run(config, check_model=False)
    assert not [line for line in lines if "] password_file" in line]  # 0600: nothing to say
    tls_line = _line(lines, "[support] tls")
    assert tls_line.startswith("WARN") and "clear text" in tls_line
    assert "0 failure(s)" not in lines[-1] and "1 warning(s)" in lines[-1]

    pw.chmod(0o640)
    _rc, lines = _run(config, check_model=False)
    assert _line(lines, "] password_file").startswith("WARN") and "group-readable" in _line(lines, "] password_file")
    assert "chmod 600" in _line(lines, "] password_file")
    assert "2 warning(s)" in lines[-1]

    pw.chmod(0o644)
    rc, lines = _run(config, check_model=False)
    assert rc == 1 and _line(lines, "] password_file").startswith("FAIL") and "world-readable" in _line(lines, "] password_file")

    pw.chmod(0o600)
    unverified = dataclasses.replace(
        config, accounts=(dataclasses.replace(config.accounts[0], tls="implicit", verify_tls=False),)
    )
    _rc, lines = _run(unverified, check_model=False)
    assert _line(lines, "verify_tls").startswith("WARN") and "1 warning(s)" in lines[-1]


def test_keyword_action_check_agrees_with_serve(dovecot: Any, imap_user: tuple[str, str], tmp_path: Path) -> None:
    """Check used a read-only EXAMINE, whose PERMANENTFLAGS is always empty, and FAILed a
    keyword account that `serve` runs fine. Both now apply imap/preflight.py's one rule."""
    from mailtriage.imap.watcher import MailboxWatcher
    from mailtriage.store.state import StateDB

    user, password = imap_user
    _make_folders(dovecot, user, password)
    config = _config(tmp_path, dovecot.host, dovecot.port, user, password, action="keyword")
    rc, lines = _run(config, check_model=False)
    assert rc == 0, "\n".join(lines)
    assert _line(lines, "watched mailbox 'INBOX' keywords").startswith("OK")
    state = StateDB(str(tmp_path / "w.sqlite3"))
    try:
        MailboxWatcher(config.accounts[0], "INBOX", config, state, lambda texts: ([], "v")).check()  # no raise
    finally:
        state.close()


def test_check_refuses_the_state_paths_serve_refuses(tmp_path: Path) -> None:
    """A directory, a path under a file, and a file that is not a mailtriage database: `serve` cannot
    open any of them, and `check` once said OK to the first."""
    import dataclasses

    from mailtriage.errors import StateError
    from mailtriage.store.state import StateDB

    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes.txt").write_text("not a database at all\n" * 10)
    base = dataclasses.replace(_config(tmp_path, "127.0.0.1", 1, "u", "p"), accounts=())
    for bad, said in ((tmp_path, "is a directory"), (tmp_path / "afile" / "s.db", "which is a file"),
                      (tmp_path / "notes.txt", "not a database")):
        rc, lines = _run(dataclasses.replace(base, state_path=str(bad)), check_model=False)
        line = _line(lines, "state database")
        assert rc == 1 and line.startswith("FAIL") and said in line, "\n".join(lines)
        with pytest.raises(StateError, match=said):  # what `serve` meets at start-up
            StateDB(bad)


def test_check_command_refuses_a_schedule_serve_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailtriage.cli.main import main

    conf = tmp_path / "config.toml"
    conf.write_text(
        f'state_path = "{tmp_path / "state.sqlite3"}"\n[training]\nschedule = "61 25 * * 9"\n'
        '[categories]\nbilling = "Support/Billing"\nlogin = "Support/Login"\n'
    )
    assert main(["check", "--config", str(conf)]) == 2
    assert "training.schedule = '61 25 * * 9'" in capsys.readouterr().err

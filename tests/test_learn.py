"""Instant learning: Dovecot's IMAPSieve hook runs `mailtriage learn` the moment staff move a message.

A real Dovecot with Pigeonhole (dovecot-sieve) pipes every message copied or moved into Support/*
to a learn.sh that execs `python -m mailtriage.cli.main learn`; the correction row must be in the
state DB as soon as the MOVE/COPY command has returned (the sieve pipe runs inside that command).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtriage.cli.main import main
from mailtriage.config import parse_config
from mailtriage.core.mailtext import message_key
from mailtriage.core.routing import Decision
from mailtriage.store.state import StateDB
from mailtriage.testing.builders import account, mail, write_config
from mailtriage.testing.dovecot import LEARN_HOOK_ARGS, load_messages

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}


def _mail(n: int) -> bytes:
    return mail(f"body {n}", f"question {n}", sender=f"customer{n}@example.com", linesep="\n")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the Dovecot user (nobody, when the tests run as root) can write: config and state DB."""
    path = Path(tempfile.mkdtemp(prefix="mailtriage-learn-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _hand_over(path: Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for p in [path, *path.iterdir()]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)


def _write_config(dir_: Path, user: str, categories: dict[str, str] = CATEGORIES) -> Path:
    # learn reads the message from its stdin: the account is never connected to, its password never read.
    return write_config(dir_ / "config.toml", dir_, categories=categories,
                        accounts=[account(username=user, password_file="/nonexistent")])


def _hook_command() -> str:
    """How learn.sh starts mailtriage as the Dovecot user (nobody when the tests run as root).

    In production the mail user runs the service's venv (/opt/mailtriage/.venv/bin/mailtriage). Here
    the venv's interpreter may sit under /root (pyenv), which nobody cannot enter: then the system
    python3 of the same minor version runs it with the venv's site-packages (and its editable install).
    """
    real = Path(os.path.realpath(sys.executable))
    # Dovecot starts the hook with an empty environment: hand on a PYTHONPATH that points this
    # interpreter at the checkout under test.
    env = f"env PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    if os.geteuid() != 0 or all(p.stat().st_mode & 0o001 for p in real.parents):
        return f"{env}{sys.executable} -m mailtriage.cli.main"
    system = shutil.which("python3.11" if sys.version_info[:2] == (3, 11) else f"python{sys.version_info[0]}.{sys.version_info[1]}",
                          path="/usr/bin:/usr/local/bin")
    if system is None:
        pytest.fail(f"the Dovecot user cannot run {real} and there is no system python{sys.version_info[0]}."
                    f"{sys.version_info[1]} to run the hook with", pytrace=False)
    import sysconfig

    site_dir = sysconfig.get_paths()["purelib"]
    code = f"import site, sys; site.addsitedir({site_dir!r}); from mailtriage.cli.main import main; sys.exit(main())"
    return f"{env}{system} -c \"{code}\""


def _decide(state: StateDB, uid: int, raw: bytes, label: str, unsure: bool,
            categories: dict[str, str] = CATEGORIES) -> str:
    key = message_key(raw)
    folder = "Support/Unsure" if unsure else categories[label]
    state.record_decision("support", "INBOX", 1, uid, key, Decision(label, 0.4 if unsure else 0.9, unsure, folder),
                          "move", "v1", False, "done")
    return key


@pytest.mark.component
def test_imapsieve_hook_records_corrections_at_move_time(
    dovecot_factory: Callable[..., Any], shared_dir: Path
) -> None:
    user = "staff"
    conf = _write_config(shared_dir, user)
    learn_sh = (
        "#!/bin/sh\n"
        f"exec {_hook_command()} learn --config {conf} {LEARN_HOOK_ARGS}"
        f" 2>>{shared_dir / 'learn.log'}\n"
    )
    server = dovecot_factory(users={user: "pw"}, learn_script=learn_sh)
    wrong, unsure, unknown, right = (_mail(n) for n in range(4))
    state = StateDB(shared_dir / "state.sqlite3")
    k_wrong = _decide(state, 1, wrong, "billing", unsure=False)
    k_unsure = _decide(state, 2, unsure, "refunds", unsure=True)
    _decide(state, 4, right, "login", unsure=False)
    state.close()
    _hand_over(shared_dir)

    load_messages(server.client(user, "pw"), "Support/Billing", [wrong])
    load_messages(server.client(user, "pw"), "Support/Unsure", [unsure, unknown])
    load_messages(server.client(user, "pw"), "Support/Login", [right])
    client = server.client(user, "pw")
    try:
        for folder in CATEGORIES.values():
            if not client.folder_exists(folder):
                client.create_folder(folder)
        client.select_folder("Support/Billing")
        client.move(client.search(["ALL"]), "Support/Login")     # filed as billing, staff says login
        client.select_folder("Support/Unsure")
        uids = client.search(["ALL"])
        client.copy(uids[:1], "Support/Refunds")                # unsure, staff sorts it (COPY fires too)
        client.move(uids[1:], "Support/Billing")                 # never decided by the daemon: ignored
        client.select_folder("Support/Login")
    finally:
        client.logout()

    rows = {r["key"]: r for r in StateDB(shared_dir / "state.sqlite3").corrections()}
    log = (shared_dir / "learn.log").read_text() if (shared_dir / "learn.log").exists() else ""
    assert set(rows) == {k_wrong, k_unsure}, f"corrections {rows}; learn.log:\n{log}\n{server.log_path.read_text()[-3000:]}"
    assert (rows[k_wrong]["predicted"], rows[k_wrong]["actual"], rows[k_wrong]["was_unsure"]) == ("billing", "login", 0)
    assert (rows[k_unsure]["predicted"], rows[k_unsure]["actual"], rows[k_unsure]["was_unsure"]) == ("refunds", "refunds", 1)
    assert "never filed by the daemon" in log


@pytest.mark.component
def test_imapsieve_hook_takes_a_folder_named_like_an_option(
    dovecot_factory: Callable[..., Any], shared_dir: Path
) -> None:
    """A category folder literally named "--verbose": without `--` in the hook the folder became the
    --verbose flag, "COPY" became the folder, and the staff move was never recorded."""
    user = "staff"
    categories = {"billing": "Support/Billing", "verbose": "--verbose"}
    conf = _write_config(shared_dir, user, categories)
    learn_sh = (
        "#!/bin/sh\n"
        f"exec {_hook_command()} learn --config {conf} {LEARN_HOOK_ARGS}"
        f" 2>>{shared_dir / 'learn.log'}\n"
    )
    server = dovecot_factory(users={user: "pw"}, learn_script=learn_sh, learn_mailboxes="*")
    raw = _mail(7)
    state = StateDB(shared_dir / "state.sqlite3")
    key = _decide(state, 1, raw, "billing", unsure=False, categories=categories)
    state.close()
    _hand_over(shared_dir)

    load_messages(server.client(user, "pw"), "Support/Billing", [raw])
    client = server.client(user, "pw")
    try:
        client.create_folder("--verbose")
        client.select_folder("Support/Billing")
        client.move(client.search(["ALL"]), "--verbose")
    finally:
        client.logout()

    rows = StateDB(shared_dir / "state.sqlite3").corrections()
    log = (shared_dir / "learn.log").read_text() if (shared_dir / "learn.log").exists() else ""
    assert [(r["key"], r["predicted"], r["actual"]) for r in rows] == [(key, "billing", "verbose")], f"learn.log:\n{log}"


@pytest.mark.pure
def test_readme_recipe_is_the_tested_hook() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"mailtriage learn --config /etc/mailtriage/config.toml {LEARN_HOOK_ARGS}\n" in readme


@pytest.mark.component
def test_learn_refuses_an_empty_user_or_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty imap.user once fell back to the only account and recorded a correction there."""
    conf = _write_config(tmp_path, "staff")
    raw = _mail(11)
    state = StateDB(tmp_path / "state.sqlite3")
    _decide(state, 1, raw, "billing", unsure=False)
    import io

    for flag in ("--user", "--account"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
        assert main(["learn", "--config", str(conf), f"{flag}=", "--", "Support/Login", "COPY"]) == 2
        assert f"{flag} is empty" in capsys.readouterr().err
    assert state.corrections() == []


@pytest.mark.component
def test_learn_command_is_idempotent_and_ignores_other_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = _write_config(tmp_path, "staff")
    raw = _mail(9)
    state = StateDB(tmp_path / "state.sqlite3")
    key = _decide(state, 1, raw, "billing", unsure=False)
    import io

    def run(*argv: str) -> int:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
        return main(["learn", "--config", str(conf), *argv])

    assert run("Support/Unsure", "COPY") == 0            # not a category folder
    assert run("Support/Billing", "COPY") == 0           # where the daemon put it
    assert state.corrections() == []
    assert run("--verbose", "Support/Login", "COPY") == 0
    assert run("Support/Login", "COPY") == 0             # the same move reported twice: one row
    assert [(r["key"], r["actual"]) for r in state.corrections()] == [(key, "login")]
    assert '"actual": "login"' in capsys.readouterr().out
    assert main(["learn", "--config", str(conf), "--account", "nope", "Support/Login"]) == 2


@pytest.mark.pure
def test_config_before_the_subcommand_is_honoured(tmp_path: Path) -> None:
    """`mailtriage --config X learn` once read /etc/mailtriage/config.toml: the subcommand's default
    None overwrote the --config given before it."""
    from mailtriage.cli.main import build_parser

    for argv in (["--config", "a.toml", "learn", "Support/X"], ["learn", "--config", "a.toml", "Support/X"]):
        args = build_parser().parse_args(argv)
        assert args.config == "a.toml" and args.log_level == "info"
    assert build_parser().parse_args(["learn", "Support/X"]).config is None
    assert build_parser().parse_args(["--log-level", "debug", "stats"]).log_level == "debug"

"""The web console over HTTP (Starlette's TestClient, the real app and a real state database): what
it refuses — no sign-in, a wrong password, a forged or missing CSRF token, too many attempts, a huge
query, an action in read-only mode — and that mail-derived text is escaped. The IMAP part (Queues,
"file as") runs against a real Dovecot."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mailtriage.config import Config
from mailtriage.errors import ConfigError
from mailtriage.model import modeldir
from mailtriage.store.state import StateDB
from mailtriage.testing.builders import account, mail, make_config
from mailtriage.testing.dovecot import Dovecot, load_messages
from mailtriage.web import auth
from mailtriage.web.app import create_app
from tests.console_fixtures import FOLDERS, UNSURE, csrf_of, decide, make_version

pytestmark = pytest.mark.component

PASSWORD = "correct horse battery staple"
HOSTILE = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., tuple[TestClient, Config, StateDB]]:
    def make(web: dict[str, Any] | None = None, **settings: Any) -> tuple[TestClient, Config, StateDB]:
        pw = tmp_path / "console.passwd"
        if not pw.exists():
            auth.write_password(pw, "lead", PASSWORD)
        settings.setdefault("training", {"model_dir": str(tmp_path / "models")})
        cfg = make_config(tmp_path, web={"password_file": str(pw), **(web or {})}, unsure_folder=UNSURE, **settings)
        state = StateDB(cfg.state_path)
        client = TestClient(create_app(cfg, state), client=("127.0.0.1", 40000), follow_redirects=False)
        return client, cfg, state

    return make


def sign_in(client: TestClient, password: str = PASSWORD, user: str = "lead") -> Any:
    page = client.get("/login")
    return client.post("/login", data={"user": user, "password": password, "csrf": csrf_of(page.text), "next": "/"})


def test_mail_text_is_hidden_before_sign_in(make_app: Any) -> None:
    client, _cfg, state = make_app()
    decide(state, mail("x", "Secret invoice 4711", sender="vip@example.com"), 1, "billing", 0.9)
    for path in ("/", "/decisions", "/decisions/1", "/queues", "/models", "/decisions?subject=Secret"):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
        assert "4711" not in response.text and "vip@" not in response.text
    login = client.get("/login")
    assert "4711" not in login.text
    assert client.post("/queues/file", data={}).status_code == 403


def test_sign_in_sets_a_strict_httponly_cookie_and_shows_decisions(make_app: Any) -> None:
    client, _cfg, state = make_app()
    decide(state, mail("x", "Secret invoice 4711", sender="vip@example.com"), 1, "billing", 0.9)
    response = sign_in(client)
    assert response.status_code == 303
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    page = client.get("/decisions")
    assert page.status_code == 200 and "Secret invoice 4711" in page.text and "vip@example.com" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_secure_cookies_when_configured(make_app: Any) -> None:
    client, *_ = make_app(web={"secure_cookies": True})
    assert "secure" in sign_in(client).headers["set-cookie"].lower()


def test_wrong_password_is_refused_then_rate_limited(make_app: Any) -> None:
    client, *_ = make_app(web={"login_attempts": 2})
    for _ in range(2):
        response = sign_in(client, password="wrong")
        assert response.status_code == 401 and "Wrong user name or password" in response.text
    response = sign_in(client)  # even the right password waits now
    assert response.status_code == 429 and "Too many failed sign-ins" in response.text
    assert int(response.headers["retry-after"]) > 0
    assert client.get("/decisions").status_code == 303  # still signed out


def test_limiter_forgets_failures_after_the_window() -> None:
    now = [1000.0]
    limiter = auth.LoginLimiter(2, 60, clock=lambda: now[0])
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.retry_after("a") == pytest.approx(60) and limiter.retry_after("b") == 0
    now[0] += 61
    assert limiter.retry_after("a") == 0


def test_forged_or_missing_csrf_is_refused(make_app: Any, tmp_path: Path) -> None:
    client, *_ = make_app(web={"allow_actions": True})
    make_version(tmp_path / "models", "20260101-000000", f1=0.8, confusion=False)
    page = client.get("/login")
    forged = client.post("/login", data={"user": "lead", "password": PASSWORD, "csrf": "forged", "next": "/"})
    assert forged.status_code == 403 and "security token" in forged.text
    assert csrf_of(page.text)  # a real token was offered
    sign_in(client)
    for data in ({"version": "20260101-000000"}, {"version": "20260101-000000", "csrf": "x" * 43}):
        response = client.post("/models/promote", data=data)
        assert response.status_code == 403 and "security token" in response.text
    assert modeldir.current_version(tmp_path / "models") is None
    # A token from another session is no better.
    other, *_ = make_app(web={"allow_actions": True})
    sign_in(other)
    stolen = csrf_of(other.get("/models").text)
    assert client.post("/models/promote", data={"version": "20260101-000000", "csrf": stolen}).status_code == 403


def test_hostile_subject_and_sender_are_escaped(make_app: Any) -> None:
    client, _cfg, state = make_app()
    decide(state, mail("x", HOSTILE, sender=f'"{HOSTILE}" <evil@example.com>'), 1, "billing", 0.3)
    sign_in(client)
    for path in ("/decisions", "/decisions/1", "/decisions?subject=<script>"):
        page = client.get(path)
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        assert "&lt;script&gt;alert" in page.text


def test_huge_or_bad_queries_are_refused_clearly(make_app: Any) -> None:
    client, *_ = make_app()
    sign_in(client)
    huge = client.get("/decisions", params={"subject": "a" * 5000})
    assert huge.status_code == 414 and "at most 4096" in huge.text
    long_term = client.get("/decisions", params={"sender": "b" * 300})
    assert long_term.status_code == 400 and "at most 200" in long_term.text
    assert "2026-13-45" in client.get("/decisions", params={"day_from": "2026-13-45"}).text
    bad = client.get("/decisions", params={"category": "nope"})
    assert bad.status_code == 400 and "not configured" in bad.text
    big_form = client.post("/login", content=b"user=" + b"x" * 20000,
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert big_form.status_code == 413


def test_search_and_decision_detail(make_app: Any) -> None:
    client, _cfg, state = make_app()
    decide(state, mail("x", "Invoice twice", sender="ann@example.com"), 1, "billing", 0.92)
    key = decide(state, mail("y", "Cannot sign in", sender="bob@example.com"), 2, "login", 0.41)
    state.record_correction(key, "support", "login", "refunds", was_unsure=True)
    sign_in(client)
    assert "Invoice twice" in client.get("/decisions", params={"sender": "ann@"}).text
    assert "Invoice twice" not in client.get("/decisions", params={"sender": "bob@"}).text
    page = client.get("/decisions", params={"outcome": "unsure"}).text
    assert "Cannot sign in" in page and "Invoice twice" not in page
    assert "Cannot sign in" not in client.get("/decisions", params={"category": "billing"}).text
    assert "Cannot sign in" not in client.get("/decisions", params={"day_to": "2001-01-01"}).text
    detail = client.get("/decisions/2").text
    assert "top labels: login 41.0%" in detail and "refunds" in detail and "below the threshold" in detail
    assert "staff moved it to <b>refunds</b>" in detail


def test_overview_shows_charts_and_the_serving_model(make_app: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    client, _cfg, state = make_app(model={"path": str(models / "current")})
    old = make_version(models, "20260101-000000", f1=0.8, confusion=False)
    modeldir.promote(models, old)
    decide(state, mail("x", "a"), 1, "billing", 0.9)
    decide(state, mail("y", "b"), 2, "login", 0.2)
    sign_in(client)
    page = client.get("/").text
    assert page.count("<svg") == 2 and "20260101-000000" in page and "50.0%" in page  # unsure share
    assert ", promoted 20" in page and "0 3 * * 0" in page and ", next 20" in page


def test_read_only_refuses_actions(make_app: Any, tmp_path: Path) -> None:
    client, *_ = make_app()
    a = make_version(tmp_path / "models", "20260101-000000", f1=0.8, confusion=False)
    make_version(tmp_path / "models", "20260102-000000", f1=0.9, confusion=False)
    modeldir.promote(tmp_path / "models", a)
    sign_in(client)
    token = csrf_of(client.get("/models").text)
    assert "Promote" not in client.get("/models").text
    for path, data in (("/models/promote", {"version": "20260102-000000"}), ("/models/rollback", {}),
                       ("/queues/file", {"account": "support", "uid": "1", "uidvalidity": "1", "label": "billing"})):
        response = client.post(path, data={**data, "csrf": token})
        assert response.status_code == 403 and "read-only" in response.text, path
    assert modeldir.current_version(tmp_path / "models") == a.resolve()


def test_promote_and_roll_back(make_app: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    client, *_ = make_app(web={"allow_actions": True})
    old = make_version(models, "20260101-000000", f1=0.8)
    new = make_version(models, "20260102-000000", f1=0.9)
    make_version(models, "20260103-000000", f1=0.9, labels=("billing", "login", "other"), confusion=False)
    modeldir.promote(models, new)
    sign_in(client)
    page = client.get("/models").text
    assert "Roll back to 20260101-000000" in page
    token = csrf_of(page)
    assert client.get("/models/20260102-000000/confusion.png").headers["content-type"] == "image/png"
    assert "macro-F1 0.900" in client.get("/models/20260102-000000/report").text
    assert client.get("/models/..%2F..%2Fetc/report").status_code == 404
    assert client.post("/models/rollback", data={"csrf": token}).status_code == 303
    assert modeldir.current_version(models) == old.resolve()
    wrong = client.post("/models/promote", data={"csrf": token, "version": "20260103-000000"})
    assert wrong.status_code == 409 and "trained on labels" in wrong.text
    assert client.post("/models/promote", data={"csrf": token, "version": "../x"}).status_code == 409
    assert modeldir.current_version(models) == old.resolve()


def test_trusted_user_header_only_when_enabled_and_from_a_trusted_proxy(make_app: Any, tmp_path: Path) -> None:
    client, *_ = make_app()
    assert client.get("/decisions", headers={"X-Remote-User": "mallory"}).status_code == 303
    client, *_ = make_app(web={"trusted_user_header": "X-Remote-User", "trusted_proxies": ["10.0.0.1"]})
    assert client.get("/decisions", headers={"X-Remote-User": "mallory"}).status_code == 303  # not from 10.0.0.1
    client, *_ = make_app(web={"trusted_user_header": "X-Remote-User"})  # 127.0.0.1 is trusted by default
    page = client.get("/decisions", headers={"X-Remote-User": "lead@example.com"})
    assert page.status_code == 200 and "lead@example.com" in page.text


def test_password_file_must_be_private(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    auth.write_password(pw, "lead", "x")
    assert oct(pw.stat().st_mode & 0o777) == "0o600" and auth.read_password_file(pw)["lead"].startswith("scrypt$")
    os.chmod(pw, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        auth.read_password_file(pw)
    assert not auth.check_password({"lead": auth.hash_password("x")}, "lead", "y")
    assert not auth.check_password({"lead": auth.hash_password("x")}, "nobody", "x")


def test_enabled_console_needs_a_way_to_sign_in(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nobody can sign in"):
        make_config(tmp_path, web={"enabled": True})


# ---- Queues against a real Dovecot ---------------------------------------------------------------


def test_file_as_moves_on_the_server_and_records_a_correction(dovecot: Dovecot, make_app: Any, tmp_path: Path
                                                              ) -> None:
    user, password = "console-q", "pw-console-q"
    dovecot.add_user(user, password)
    acct = account(port=dovecot.port, username=user, password=password, secret_dir=tmp_path, mailboxes=["INBOX"])
    client, cfg, state = make_app(web={"allow_actions": True, "snippet_chars": 200}, accounts=[acct])
    raw = mail("My card was charged twice for the same order, please refund", f"Double charge {HOSTILE}",
               sender="carol@example.com")
    key = decide(state, raw, 7, "billing", 0.45)  # the daemon sent it to the unsure folder
    with dovecot.client(user, password) as imap:
        for folder in FOLDERS.values():
            imap.create_folder(folder)
        load_messages(imap, UNSURE, [raw])
    sign_in(client)
    page = client.get("/queues")
    assert page.status_code == 200 and "Double charge" in page.text and "<script>alert" not in page.text
    assert "billing 45.0%" in page.text and "My card was charged twice for the" in page.text
    form = dict(uid=page.text.split('name="uid" value="')[1].split('"')[0],
                uidvalidity=page.text.split('name="uidvalidity" value="')[1].split('"')[0])
    response = client.post("/queues/file", data={"csrf": csrf_of(page.text), "account": "support", "folder": UNSURE,
                                                  "label": "refunds", **form})
    assert response.status_code == 303, response.text
    with dovecot.client(user, password) as imap:
        assert imap.select_folder(UNSURE)[b"EXISTS"] == 0
        assert imap.select_folder(FOLDERS["refunds"])[b"EXISTS"] == 1
    (corr,) = state.corrections()
    assert (corr["key"], corr["predicted"], corr["actual"], corr["was_unsure"]) == (key, "billing", "refunds", 1)
    again = client.post("/queues/file", data={"csrf": csrf_of(page.text), "account": "support", "folder": UNSURE,
                                              "label": "refunds", **form})
    assert again.status_code == 409 and "no longer in" in again.text


def test_charts_are_svg_with_escaped_labels() -> None:
    from mailtriage.web import charts

    svg = charts.stacked_bars("t", [("2026-01-01", {"filed": 3, "unsure": 2}), ("2026-01-02", {})])
    assert svg.startswith("<svg") and svg.count("<rect") == 2 + 4  # two bars' parts + four legend boxes
    assert ">4<" in svg and ">8<" in svg  # whole-number grid up to 8 for a peak of 5
    line = charts.lines("t", ["2026-01-01", "2026-01-08"], {"<b>x</b>": [0.5, None]})
    assert "<b>x</b>" not in line and "&lt;b&gt;x&lt;/b&gt;" in line


def test_rate_limit_counts_per_client_behind_the_proxy(make_app: Any) -> None:
    client, *_ = make_app(web={"login_attempts": 1})  # the TestClient's peer, 127.0.0.1, is a trusted proxy

    def attempt(forwarded: str, password: str) -> int:
        page = client.get("/login")
        return client.post("/login", headers={"X-Forwarded-For": forwarded},
                           data={"user": "lead", "password": password, "csrf": csrf_of(page.text)}).status_code

    assert attempt("203.0.113.5", "wrong") == 401
    assert attempt("203.0.113.5", PASSWORD) == 429
    # Another client is not locked out; a forged first entry does not pick the address.
    assert attempt("203.0.113.5, 198.51.100.7", PASSWORD) == 303


def test_check_reports_the_console(tmp_path: Path) -> None:
    import io

    from mailtriage.cli.check import run_check

    pw = tmp_path / "pw"
    auth.write_password(pw, "lead", "x")
    out = io.StringIO()
    cfg = make_config(tmp_path, web={"enabled": True, "password_file": str(pw), "listen_host": "0.0.0.0",
                                     "listen_port": 18025})
    run_check(cfg, out=out, check_model=False)
    assert "OK    web password_file: 1 user(s): lead" in out.getvalue()
    assert "reachable from other hosts without TLS" in out.getvalue()
    os.chmod(pw, 0o644)
    out = io.StringIO()
    assert run_check(cfg, out=out, check_model=False) == 1 and "chmod 600" in out.getvalue()


@pytest.mark.parametrize("target", ["//evil.example/", "/\t/evil.example", "https://evil.example/", "/\\evil"])
def test_sign_in_never_redirects_off_site(make_app: Any, target: str) -> None:
    client, *_ = make_app()
    page = client.get("/login")
    response = client.post("/login", data={"user": "lead", "password": PASSWORD, "csrf": csrf_of(page.text),
                                           "next": target})
    assert response.status_code == 303 and response.headers["location"] == "/"


def test_mailtriage_web_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import urllib.request

    from mailtriage.testing.builders import write_config
    from mailtriage.testing.imapserver import free_port
    from mailtriage.testing.waits import wait_for

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    pw = tmp_path / "console.passwd"
    made = subprocess.run([sys.executable, "-m", "mailtriage.cli.main", "web", "--hash-password", str(pw), "--user",
                           "lead"], input="s3cret\n", capture_output=True, text=True, env=env, timeout=60)
    assert made.returncode == 0, made.stderr
    assert auth.check_password(auth.read_password_file(pw), "lead", "s3cret")
    port = free_port()
    config = write_config(tmp_path / "config.toml", tmp_path, web={"password_file": str(pw), "listen_port": port})
    proc = subprocess.Popen([sys.executable, "-m", "mailtriage.cli.main", "--config", str(config), "web"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        def answers() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2).status == 200
            except OSError:
                return False
        wait_for(answers, 60, "the console answering")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert f"console: http://127.0.0.1:{port}/ (read-only)" in out

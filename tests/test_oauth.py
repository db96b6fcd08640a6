"""`mailtriage auth` and XOAUTH2/OAUTHBEARER logins, end to end on 127.0.0.1.

A stub OAuth server (http.server) plays Microsoft identity / Google: device-code endpoint, token
endpoint (device grant, authorization-code grant with PKCE, refresh grant with rotating refresh
tokens) and an RFC 7662 introspection endpoint. A real Dovecot 2.3 checks every XOAUTH2/OAUTHBEARER
login against that introspection endpoint (its oauth2 passdb), so a login only succeeds with an
access token the stub really issued and has not expired.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog

from mailtriage.cli.main import main
from mailtriage.config import AccountConfig, Config, parse_config
from mailtriage.testing.builders import account, mail, make_config, write_config
from mailtriage.testing.waits import wait_for
from mailtriage.errors import ConfigError, MailboxError
from mailtriage.imap import connection, oauth

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login"}
SECRET_AT, SECRET_RT = "at-SECRET-4711", "rt-SECRET-0815"
ABSENT = object()


class StubOAuth:
    """Issues tokens for one user; ``approve()`` plays the admin entering the device code."""

    def __init__(self, user: str, lifetime: float = 3600) -> None:
        self.user = user
        self.lifetime = lifetime
        self.approved = threading.Event()
        self.access: dict[str, float] = {}      # access token -> expiry (monotonic clock of the stub)
        self.refresh: set[str] = set()
        self.codes: dict[str, str] = {}          # authorization code -> PKCE challenge
        self.calls: list[dict[str, str]] = []
        self.n = 0
        self.hostile: str | None = None        # how /token misbehaves: form | trickle | huge | redirect
        self.grant_extra: dict[str, Any] = {}  # merged into every grant (e.g. a broken expires_in)
        self.closing = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
                stub.calls.append({"path": self.path, **form})
                if stub.hostile and self.path == "/token":
                    try:
                        return self._hostile(stub.hostile)
                    except (BrokenPipeError, ConnectionResetError):
                        return None  # the client gave up
                code, body = stub.handle(self.path, form)
                payload = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _hostile(self, mode: str) -> None:
                if mode == "form":  # RFC 6749 wants JSON; some endpoints answer a form
                    payload = f"access_token={SECRET_AT}&refresh_token={SECRET_RT}&expires_in=3600".encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-www-form-urlencoded")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                elif mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", f"{stub.url}/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif mode == "huge":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(100 << 20))
                    self.end_headers()
                    for _ in range(1600):
                        self.wfile.write(b" " * 65536)
                elif mode == "trickle":  # one byte every 0.1 s for 15 s: each read is quick, the call is not
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
                    for _ in range(150):
                        if stub.closing.wait(0.1):
                            return
                        self.wfile.write(b" ")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _grant(self) -> dict[str, Any]:
        self.n += 1
        access, refresh = f"at-{self.n}", f"rt-{self.n}"
        self.access[access] = time.monotonic() + self.lifetime
        self.refresh.add(refresh)
        grant = {"token_type": "Bearer", "access_token": access, "refresh_token": refresh,
                 "expires_in": self.lifetime, "scope": "IMAP", **self.grant_extra}
        return {k: v for k, v in grant.items() if v is not ABSENT}

    def handle(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path == "/devicecode":
            return 200, {"device_code": "dev-1", "user_code": "ABCD-EFGH", "verification_uri": "https://stub/device",
                         "expires_in": 60, "interval": 0.05}
        if path == "/introspect":
            expiry = self.access.get(form.get("token", ""))
            if expiry is None or expiry < time.monotonic():
                return 200, {"active": False}
            return 200, {"active": True, "username": self.user}
        if path != "/token":
            return 404, {"error": "not_found"}
        grant = form.get("grant_type")
        if grant == oauth._DEVICE_GRANT:
            if not self.approved.is_set():
                self.approved.set()  # the admin enters the code after the first poll
                return 400, {"error": "authorization_pending"}
            return 200, self._grant()
        if grant == "refresh_token":
            if form.get("refresh_token") not in self.refresh:
                return 400, {"error": "invalid_grant", "error_description": "refresh token revoked"}
            self.refresh.discard(form["refresh_token"])  # rotation: each refresh token works once
            return 200, self._grant()
        if grant == "authorization_code":
            challenge = self.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "")
            expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if challenge is None or challenge != expected:
                return 400, {"error": "invalid_grant", "error_description": "PKCE check failed"}
            return 200, self._grant()
        return 400, {"error": "unsupported_grant_type"}

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubOAuth]:
    server = StubOAuth("staff")
    try:
        yield server
    finally:
        server.close()


def _settings(stub: StubOAuth, port: int = 143, auth: str = "xoauth2", provider: str = "microsoft") -> dict[str, Any]:
    """One OAuth account signing in at the stub, as keyword arguments of the config builders."""
    m365 = account("m365", port=port, username="staff", auth=auth, oauth_provider=provider, oauth_client_id="client-123",
                   oauth_token_url=f"{stub.url}/token", oauth_device_url=f"{stub.url}/devicecode",
                   oauth_authorize_url=f"{stub.url}/authorize")
    return {"categories": CATEGORIES, "accounts": [m365]}


def _config(tmp_path: Path, stub: StubOAuth, port: int = 143, auth: str = "xoauth2", provider: str = "microsoft") -> Config:
    return make_config(tmp_path / "state", **_settings(stub, port, auth, provider))


@pytest.mark.pure
def test_provider_defaults_and_validation(tmp_path: Path) -> None:
    ms = AccountConfig(name="a", host="h", username="u", auth="xoauth2", oauth_provider="microsoft", oauth_client_id="c")
    p = oauth.provider_for(ms)
    assert p.scope == "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
    assert p.device_url == "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode"
    g = oauth.provider_for(AccountConfig(name="g", host="h", username="u", auth="xoauth2", oauth_provider="google",
                                         oauth_client_id="c"))
    assert g.scope == "https://mail.google.com/" and g.device_url is None  # Google: loopback only
    with pytest.raises(ConfigError, match="oauth_client_id"):
        AccountConfig(name="a", host="h", username="u", auth="xoauth2", oauth_provider="microsoft")
    with pytest.raises(ConfigError, match="exactly one of oauth_provider"):
        AccountConfig(name="a", host="h", username="u", auth="xoauth2", oauth_provider="google", oauth_client_id="c",
                      oauth_token_file="/x")
    cfg = parse_config({"categories": CATEGORIES, "state_path": str(tmp_path / "s" / "db.sqlite3"),
                        "accounts": [{"name": "m", "host": "h", "username": "u", "auth": "xoauth2",
                                      "oauth_provider": "microsoft", "oauth_client_id": "c"}]})
    assert cfg.accounts[0].oauth_token_store == str(tmp_path / "s" / "oauth-m.json")


@pytest.mark.component
def test_device_flow_stores_refresh_token_0600_and_dovecot_accepts_it(
    dovecot_factory: Callable[..., Any], stub: StubOAuth, tmp_path: Path
) -> None:
    server = dovecot_factory(users={"staff": "pw"}, oauth2_introspection_url=f"{stub.url}/introspect")
    cfg = _config(tmp_path, stub, port=server.port)
    conf = write_config(tmp_path / "config.toml", tmp_path / "state", **_settings(stub, server.port))  # for main()
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert main(["auth", "--config", str(conf), "m365"]) == 0
    assert "ABCD-EFGH" in out.getvalue() and "https://stub/device" in out.getvalue()
    store = Path(cfg.accounts[0].oauth_token_store or "")
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    saved = json.loads(store.read_text())
    assert saved["refresh_token"] == "rt-1" and saved["access_token"] == "at-1"
    device_call = next(c for c in stub.calls if c["path"] == "/devicecode")
    assert device_call["scope"] == "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
    assert device_call["client_id"] == "client-123"

    client = connection.connect(cfg.accounts[0], timeout=10)
    try:
        assert client.list_folders()
    finally:
        connection.close(client)


@pytest.mark.component
@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_expired_access_token_is_refreshed_before_login(
    dovecot_factory: Callable[..., Any], stub: StubOAuth, tmp_path: Path, auth: str
) -> None:
    server = dovecot_factory(users={"staff": "pw"}, oauth2_introspection_url=f"{stub.url}/introspect")
    cfg = _config(tmp_path, stub, port=server.port, auth=auth)
    account = cfg.accounts[0]
    oauth.device_flow(account, io.StringIO(), sleep=lambda s: None)
    store = oauth.TokenStore(account)
    # The access token expires in 60 s (inside the refresh margin) and the stub already considers it dead.
    data = store.load()
    data["expires_at"] = time.time() + 60
    store.save(data)
    stub.access[data["access_token"]] = 0.0

    client = connection.connect(account, timeout=10)
    connection.close(client)
    saved = store.load()
    assert saved["access_token"] == "at-2" and saved["refresh_token"] == "rt-2"  # rotated token saved
    refresh = [c for c in stub.calls if c.get("grant_type") == "refresh_token"]
    assert len(refresh) == 1 and refresh[0]["refresh_token"] == "rt-1" and refresh[0]["client_id"] == "client-123"
    # A token still valid for longer than the margin is used as is: no second refresh.
    client = connection.connect(account, timeout=10)
    connection.close(client)
    assert len([c for c in stub.calls if c.get("grant_type") == "refresh_token"]) == 1
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


@pytest.mark.component
def test_revoked_refresh_token_says_run_auth_again(stub: StubOAuth, tmp_path: Path) -> None:
    account = _config(tmp_path, stub).accounts[0]
    with pytest.raises(MailboxError, match="mailtriage auth m365"):
        oauth.access_token(account)  # never signed in
    oauth.device_flow(account, io.StringIO(), sleep=lambda s: None)
    store = oauth.TokenStore(account)
    data = store.load()
    data["expires_at"] = 0
    store.save(data)
    stub.refresh.clear()
    with pytest.raises(MailboxError, match="invalid_grant.*run `mailtriage auth m365` again"):
        oauth.access_token(account)


@pytest.mark.component
def test_dovecot_refuses_a_token_it_cannot_introspect(
    dovecot_factory: Callable[..., Any], stub: StubOAuth, tmp_path: Path
) -> None:
    server = dovecot_factory(users={"staff": "pw"}, oauth2_introspection_url=f"{stub.url}/introspect")
    account = _config(tmp_path, stub, port=server.port).accounts[0]
    store = oauth.TokenStore(account)
    store.save({"access_token": "forged", "refresh_token": "rt-x", "expires_at": time.time() + 3600})
    with pytest.raises(MailboxError, match="refused by server"):
        connection.connect(account, timeout=10)


@pytest.mark.component
def test_loopback_flow_with_pkce(stub: StubOAuth, tmp_path: Path) -> None:
    account = _config(tmp_path, stub, provider="google").accounts[0]

    def browser(url: str) -> None:
        # Plays Google's consent page: remembers the PKCE challenge, redirects to the loopback URL.
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert q["scope"] == "https://mail.google.com/" and q["code_challenge_method"] == "S256"
        assert q["access_type"] == "offline"
        stub.codes["code-1"] = q["code_challenge"]
        redirect = f"{q['redirect_uri']}?code=code-1&state={q['state']}"
        threading.Thread(target=lambda: urllib.request.urlopen(redirect, timeout=10).read(), daemon=True).start()

    data = oauth.loopback_flow(account, io.StringIO(), open_url=browser, timeout=30)
    assert data["refresh_token"] == "rt-1"
    exchange = next(c for c in stub.calls if c.get("grant_type") == "authorization_code")
    assert exchange["redirect_uri"].startswith("http://127.0.0.1:")


@pytest.mark.component
def test_watcher_files_mail_on_exchange_like_server_with_oauth(
    dovecot_factory: Callable[..., Any], stub: StubOAuth, tmp_path: Path
) -> None:
    """Exchange Online offers neither CONDSTORE/QRESYNC nor SPECIAL-USE and takes only OAuth: the
    watcher must still catch up, IDLE and file mail, signing in with a refreshed token."""
    from mailtriage.core.classifier import Prediction
    from mailtriage.imap.watcher import MailboxWatcher
    from mailtriage.store.state import StateDB
    from mailtriage.testing.dovecot import imap_capability_without, load_messages

    exchange_like = imap_capability_without("CONDSTORE", "QRESYNC", "SPECIAL-USE")
    server = dovecot_factory(users={"staff": "pw"}, oauth2_introspection_url=f"{stub.url}/introspect",
                             extra_conf=exchange_like)
    cfg = _config(tmp_path, stub, port=server.port)
    account = cfg.accounts[0]
    oauth.device_flow(account, io.StringIO(), sleep=lambda s: None)
    admin = server.client("staff", "pw")
    for folder in (*CATEGORIES.values(), cfg.unsure_folder):
        admin.create_folder(folder)
    assert not admin.has_capability("CONDSTORE") and not admin.has_capability("SPECIAL-USE")

    def classify(texts: Any) -> tuple[list[Prediction], str]:
        return [Prediction("login", 0.9, {"billing": 0.1, "login": 0.9}) for _ in texts], "v1"

    watcher = MailboxWatcher(account, "INBOX", cfg, StateDB(cfg.state_path), classify, idle_slice=0.2, backoff_start=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        load_messages(admin, "INBOX", [mail("my login fails", "cannot log in", sender="c@example.com", linesep="\n")])
        wait_for(lambda: int(admin.folder_status("Support/Login", [b"MESSAGES"])[b"MESSAGES"]) == 1, 20, interval=0.1)
        assert int(admin.folder_status("Support/Login", [b"MESSAGES"])[b"MESSAGES"]) == 1
    finally:
        stop.set()
        thread.join(10)
        admin.logout()
    assert "method=XOAUTH2" in server.log_path.read_text()


def _signed_in_but_expired(stub: StubOAuth, tmp_path: Path) -> AccountConfig:
    account = _config(tmp_path, stub).accounts[0]
    oauth.device_flow(account, io.StringIO(), sleep=lambda s: None)
    store = oauth.TokenStore(account)
    data = store.load()
    data["expires_at"] = 0  # the next access_token() refreshes
    store.save(data)
    return account


@pytest.mark.component
def test_a_form_encoded_token_answer_never_reaches_the_log(stub: StubOAuth, tmp_path: Path) -> None:
    account = _signed_in_but_expired(stub, tmp_path)
    stub.hostile = "form"
    with structlog.testing.capture_logs() as logs, pytest.raises(MailboxError) as err:
        oauth.access_token(account)
    assert "HTTP 200" in str(err.value) and "not JSON" in str(err.value)
    everything = str(err.value) + repr(logs)
    assert "SECRET" not in everything, everything
    [event] = [e for e in logs if e["event"] == "oauth_answer_refused"]
    assert event["status"] == 200 and event["length"] == len(f"access_token={SECRET_AT}&refresh_token={SECRET_RT}&expires_in=3600")


@pytest.mark.component
@pytest.mark.parametrize(
    "expires_in,lifetime",
    [("abc", 0.0), (ABSENT, 3600.0), (None, 0.0), (-5, 0.0), ("1800", 1800.0), (float("nan"), 0.0),
     (True, 0.0), ([3600], 0.0), (10**9, 86400.0)],
)
def test_a_broken_expires_in_is_no_traceback(stub: StubOAuth, tmp_path: Path, expires_in: Any, lifetime: float) -> None:
    account = _signed_in_but_expired(stub, tmp_path)
    stub.grant_extra = {"expires_in": expires_in}
    with structlog.testing.capture_logs() as logs:
        before = time.time()
        token = oauth.access_token(account)
    saved = oauth.TokenStore(account).load()
    assert token == saved["access_token"] == "at-2"
    # Unusable: counted as expired, so the next connect refreshes again (never a stale token).
    assert before + lifetime - 1 <= saved["expires_at"] <= time.time() + lifetime + 1
    assert any(e["event"] == "oauth_answer_value_invalid" for e in logs) == (lifetime == 0.0)
    assert oauth.access_token(account) == ("at-3" if lifetime == 0.0 else "at-2")


@pytest.mark.component
@pytest.mark.parametrize("mode,match", [("trickle", "no complete answer within the 1 s deadline"),
                                        ("huge", "over the 1048576-byte cap"),
                                        ("redirect", "never follows redirects")])
def test_a_hostile_token_endpoint_is_a_clear_error_within_the_deadline(
    stub: StubOAuth, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, match: str
) -> None:
    account = _signed_in_but_expired(stub, tmp_path)
    monkeypatch.setattr(oauth, "CALL_DEADLINE_S", 1.0)
    stub.hostile = mode
    started = time.monotonic()
    with pytest.raises(MailboxError, match=match):
        oauth.access_token(account)
    assert time.monotonic() - started < 10  # the deadline's bound, not a speed goal: the trickle lasts 15 s
    assert not [c for c in stub.calls if c["path"] == "/elsewhere"]  # a redirect is not followed

"""OAuth2 sign-in for IMAP accounts (Microsoft 365, Gmail): `mailtriage auth ACCOUNT` and token refresh.

- ``authorize(account)`` runs the interactive flow once: the device-code flow (Microsoft: the admin
  opens the printed URL on any machine and types the code) or the loopback flow with PKCE (Google,
  whose device flow does not grant the Gmail scope: a browser is sent to an authorization URL and
  comes back to ``http://127.0.0.1:PORT/``; from a headless server, forward the port with
  ``ssh -L PORT:127.0.0.1:PORT``). The refresh token is stored as JSON, mode 0600, in the state
  directory (``oauth-ACCOUNT.json`` beside the state database, or ``oauth_token_store``).
- ``access_token(account)`` returns a valid access token, refreshing it with the stored refresh
  token when it expires within ``REFRESH_MARGIN_S`` (a rotated refresh token is saved at once).
  The IMAP connection calls it at every (re)connect and authenticates with XOAUTH2 or OAUTHBEARER.

Standard library only. Every call to an OAuth endpoint has one total deadline (``CALL_DEADLINE_S``)
and a byte cap (``MAX_ANSWER_BYTES``) and never follows a redirect (``mailtriage.httpcall``), so a hung
token endpoint cannot hold a reconnect for ever. Answers of these endpoints carry credentials: they are
never logged nor put into an error message, only their status, length and content type. Endpoints can
be overridden per account (``oauth_token_url``, ``oauth_device_url``, ``oauth_authorize_url``), which is
how the tests point them at a local stub.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.server
import json
import os
import secrets
import math
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from mailtriage import httpcall
from mailtriage.config import AccountConfig
from mailtriage.errors import ConfigError, MailboxError

log = structlog.get_logger(__name__)

# Refresh this long before the access token expires (Microsoft and Google hand out tokens valid for 1 hour).
REFRESH_MARGIN_S = 300
CALL_DEADLINE_S = 30.0          # one whole call to an OAuth endpoint: connect, send, the full answer
MAX_ANSWER_BYTES = 1 << 20      # a token answer is a few KB
DEFAULT_LIFETIME_S = 3600.0     # expires_in is optional (RFC 6749 §5.1): the providers' usual hour
MAX_LIFETIME_S = 86400.0        # trust no longer than a day without asking again
_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass(frozen=True)
class Provider:
    scope: str
    token_url: str
    device_url: str | None       # None: no device flow for this scope (loopback only)
    authorize_url: str | None


def provider_for(account: AccountConfig) -> Provider:
    """The endpoints and scope of ``account.oauth_provider``, with the account's overrides applied."""
    tenant = account.oauth_tenant or "organizations"
    if account.oauth_provider == "microsoft":
        base = f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
        p = Provider("https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
                     f"{base}/token", f"{base}/devicecode", f"{base}/authorize")
    elif account.oauth_provider == "google":
        p = Provider("https://mail.google.com/", "https://oauth2.googleapis.com/token", None,
                     "https://accounts.google.com/o/oauth2/v2/auth")
    else:  # "custom": everything from the account
        p = Provider(account.oauth_scope or "", account.oauth_token_url or "", account.oauth_device_url,
                     account.oauth_authorize_url)
    return Provider(
        scope=account.oauth_scope or p.scope,
        token_url=account.oauth_token_url or p.token_url,
        device_url=account.oauth_device_url or p.device_url,
        authorize_url=account.oauth_authorize_url or p.authorize_url,
    )


def _client_secret(account: AccountConfig) -> str | None:
    if not account.oauth_client_secret_file:
        return None
    try:
        return Path(account.oauth_client_secret_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"accounts[{account.name!r}].oauth_client_secret_file = {account.oauth_client_secret_file!r} "
            f"cannot be read: {exc.strerror}"
        ) from exc


def _post(url: str, fields: dict[str, str], timeout: float | None = None) -> tuple[int, dict[str, Any]]:
    """POST a form, return (HTTP status, JSON body); OAuth errors come as 400 with a JSON body.

    The answer may hold tokens: what goes into a log or an error is its status, length and type only.
    """
    data = urllib.parse.urlencode(fields).encode()
    try:
        answer = httpcall.post(url, data, deadline_s=CALL_DEADLINE_S if timeout is None else timeout,
                               max_bytes=MAX_ANSWER_BYTES,
                               headers={"Content-Type": "application/x-www-form-urlencoded",
                                        "Accept": "application/json"})
    except httpcall.CallFailed as exc:
        raise MailboxError(f"the OAuth server call failed: {exc}; it is tried again at the next reconnect",
                           transient=exc.kind in ("unreachable", "deadline")) from exc
    status, raw = answer.status, answer.body
    shape = f"HTTP {status}, {len(raw)} bytes of {answer.content_type}"
    if 300 <= status < 400:
        log.warning("oauth_answer_refused", url=url, status=status, length=len(raw), why="redirect")
        raise MailboxError(f"the OAuth server {url} answered a redirect ({shape}); mailtriage never follows "
                           "redirects: set the endpoint's final address (oauth_token_url / oauth_device_url)")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:
        log.warning("oauth_answer_refused", url=url, status=status, length=len(raw),
                    content_type=answer.content_type, why="not JSON")
        raise MailboxError(
            f"the OAuth server {url} answered {shape}, not JSON (RFC 6749 §5.1); the body is not shown "
            "because it may hold credentials: is oauth_token_url the provider's OAuth 2.0 token endpoint?",
            transient=status >= 500,
        ) from exc
    if not isinstance(body, dict):
        log.warning("oauth_answer_refused", url=url, status=status, length=len(raw), why="not a JSON object")
        raise MailboxError(f"the OAuth server {url} answered {shape} holding a JSON {type(body).__name__}; "
                           "expected a JSON object")
    return status, body


def _seconds(value: Any, default: float, what: str, url: str | None) -> float:
    """A lifetime or interval from an OAuth answer: a number (or a numeric string) of seconds, in range.

    Anything else (text, null, negative, NaN) is logged and replaced by ``default``: a
    refresh that happens sooner than needed costs one call, a traceback costs every reconnect.
    """
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        log.warning("oauth_answer_value_invalid", field=what, url=url, type=type(value).__name__, using=default)
        return default
    return number


# -- the token store ------------------------------------------------------------------------------


class TokenStore:
    """The account's tokens in one JSON file (0600). Refreshes are serialized by a lock file."""

    _locks: dict[str, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, account: AccountConfig) -> None:
        if not account.oauth_token_store:
            raise ConfigError(f"accounts[{account.name!r}] has no oauth_token_store (set oauth_provider)")
        self.account = account
        self.path = Path(account.oauth_token_store)
        with self._locks_guard:
            self._lock = self._locks.setdefault(str(self.path), threading.Lock())

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MailboxError(
                f"accounts[{self.account.name!r}] has no OAuth tokens yet ({self.path} is missing): "
                f"run `mailtriage auth {self.account.name}` once as the service user"
            ) from None
        except (OSError, ValueError) as exc:
            raise MailboxError(f"the OAuth token store {self.path} is unreadable: {exc}; run `mailtriage auth "
                               f"{self.account.name}` again") from exc
        if not isinstance(data, dict) or not data.get("refresh_token"):
            raise MailboxError(f"{self.path} holds no refresh_token; run `mailtriage auth {self.account.name}` again")
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def store_grant(self, grant: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """Save a token-endpoint answer (keeps the old refresh token when none is sent back).

        An ``expires_in`` that is absent counts as an hour; one that is not a sane number (text,
        negative, NaN) as already expired, so the token is refreshed at the next connect.
        """
        now = time.time() if now is None else now
        if not isinstance(grant.get("access_token"), str) or not grant["access_token"]:
            fields = sorted(map(str, grant))[:20]
            raise MailboxError(f"the OAuth server answered without an access_token (fields: {fields})")
        token_url = provider_for(self.account).token_url
        lifetime = min(_seconds(grant.get("expires_in", DEFAULT_LIFETIME_S), 0.0, "expires_in", token_url),
                       MAX_LIFETIME_S)
        old_refresh = None
        if self.path.exists():
            try:
                old_refresh = json.loads(self.path.read_text(encoding="utf-8")).get("refresh_token")
            except (OSError, ValueError):
                old_refresh = None
        refresh = grant.get("refresh_token") if isinstance(grant.get("refresh_token"), str) else None
        refresh = refresh or old_refresh
        if not refresh:
            raise MailboxError(
                "the OAuth server issued no refresh_token: for Microsoft the scope must include offline_access; "
                "for Google the consent needs access_type=offline (re-run `mailtriage auth` to grant it again)"
            )
        data = {
            "account": self.account.name,
            "provider": self.account.oauth_provider,
            "access_token": grant["access_token"],
            "refresh_token": refresh,
            "expires_at": now + lifetime,
            "scope": grant.get("scope") if isinstance(grant.get("scope"), str) else None,
            "updated_at": now,
        }
        self.save(data)
        return data

    def access_token(self, now: float | None = None) -> str:
        """A token valid for at least REFRESH_MARGIN_S, refreshed (and saved) when needed."""
        with self._lock, open(self._lock_path(), "a") as lock_fh:
            fcntl.flock(lock_fh, fcntl.LOCK_EX)  # another process (mailtriage auth, a 2nd daemon) may refresh too
            now = time.time() if now is None else now
            data = self.load()
            expires_at = data.get("expires_at")
            valid = isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool) and math.isfinite(expires_at)
            if data.get("access_token") and valid and expires_at - now > REFRESH_MARGIN_S:
                return str(data["access_token"])
            return str(self._refresh(data, now)["access_token"])

    def _lock_path(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.with_name(self.path.name + ".lock")

    def _refresh(self, data: dict[str, Any], now: float) -> dict[str, Any]:
        account, provider = self.account, provider_for(self.account)
        fields = {"grant_type": "refresh_token", "refresh_token": data["refresh_token"],
                  "client_id": account.oauth_client_id or "", "scope": provider.scope}
        secret = _client_secret(account)
        if secret:
            fields["client_secret"] = secret
        status, body = _post(provider.token_url, fields)
        if status != 200 or "access_token" not in body:
            error = _text(body.get("error")) or f"HTTP {status}"
            hint = (f"the refresh token was revoked or expired: run `mailtriage auth {account.name}` again"
                    if error == "invalid_grant" else "check oauth_client_id / oauth_client_secret_file and the tenant")
            raise MailboxError(
                f"refreshing the OAuth token of account {account.name!r} at {provider.token_url} failed: {error} "
                f"({_text(body.get('error_description'))}); {hint}",
                transient=status >= 500 or status == 429,
            )
        return self.store_grant(body, now)


def _text(value: Any) -> str:
    # The error fields of an OAuth answer, as text for a message: short, and only when they are text.
    return value[:200] if isinstance(value, str) else ""


def access_token(account: AccountConfig) -> str:
    return TokenStore(account).access_token()


# -- interactive flows (mailtriage auth) ----------------------------------------------------------


def device_flow(account: AccountConfig, out: TextIO, *, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """RFC 8628: ask for a user code, print where to enter it, poll until granted; store the tokens."""
    provider = provider_for(account)
    if not provider.device_url:
        raise ConfigError(
            f"accounts[{account.name!r}]: provider {account.oauth_provider!r} has no device-code flow for its "
            "scope; use `mailtriage auth --loopback`"
        )
    client_id = account.oauth_client_id or ""
    secret = _client_secret(account)
    status, start = _post(provider.device_url, {"client_id": client_id, "scope": provider.scope})
    if status != 200 or "device_code" not in start:
        raise MailboxError(f"{provider.device_url} refused the device-code request: "
                           f"{start.get('error', status)} {start.get('error_description', '')}")
    url = start.get("verification_uri") or start.get("verification_url")
    print(start.get("message") or f"To sign in {account.username}, open {url} and enter the code {start['user_code']}",
          file=out, flush=True)
    interval = min(_seconds(start.get("interval", 5.0), 5.0, "interval", provider.device_url), 60.0)
    lifetime = _seconds(start.get("expires_in", 900.0), 900.0, "expires_in", provider.device_url)
    deadline = time.monotonic() + min(lifetime, 3600.0)
    fields = {"grant_type": _DEVICE_GRANT, "device_code": start["device_code"], "client_id": client_id}
    if secret:
        fields["client_secret"] = secret
    while time.monotonic() < deadline:
        sleep(interval)
        status, body = _post(provider.token_url, fields)
        if status == 200 and "access_token" in body:
            return TokenStore(account).store_grant(body)
        error = body.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        raise MailboxError(f"sign-in for {account.name!r} failed: {error or status} {body.get('error_description', '')}")
    raise MailboxError(f"sign-in for {account.name!r} timed out: the code was not entered in time; run it again")


def loopback_flow(
    account: AccountConfig, out: TextIO, *, port: int = 0, timeout: float = 600,
    open_url: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Authorization-code flow with PKCE and a one-shot HTTP listener on 127.0.0.1 (RFC 8252)."""
    provider = provider_for(account)
    if not provider.authorize_url:
        raise ConfigError(f"accounts[{account.name!r}]: no oauth_authorize_url for the loopback flow")
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    got: dict[str, str] = {}
    done = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            if query.get("state") != state:
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b"state mismatch: start `mailtriage auth` again")
                return
            got.update(query)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            self.wfile.write(b"mailtriage: signed in, you can close this tab." if "code" in query
                             else b"mailtriage: sign-in was refused.")
            done.set()

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    redirect = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        query = urllib.parse.urlencode({
            "client_id": account.oauth_client_id or "", "redirect_uri": redirect, "response_type": "code",
            "scope": provider.scope, "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
            "access_type": "offline", "prompt": "consent", "login_hint": account.username,
        })
        url = f"{provider.authorize_url}?{query}"
        print(f"To sign in {account.username}, open this URL in a browser (from another machine forward the "
              f"port first: ssh -L {server.server_address[1]}:127.0.0.1:{server.server_address[1]} THIS-HOST):\n{url}",
              file=out, flush=True)
        if open_url is not None:
            open_url(url)
        if not done.wait(timeout):
            raise MailboxError(f"sign-in for {account.name!r} timed out after {timeout:.0f} s; run it again")
    finally:
        server.shutdown()
        server.server_close()
    if "code" not in got:
        raise MailboxError(f"sign-in for {account.name!r} was refused: {got.get('error', 'no code')} "
                           f"{got.get('error_description', '')}")
    fields = {"grant_type": "authorization_code", "code": got["code"], "redirect_uri": redirect,
              "client_id": account.oauth_client_id or "", "code_verifier": verifier}
    secret = _client_secret(account)
    if secret:
        fields["client_secret"] = secret
    status, body = _post(provider.token_url, fields)
    if status != 200 or "access_token" not in body:
        raise MailboxError(f"exchanging the sign-in code at {provider.token_url} failed: "
                           f"{body.get('error', status)} {body.get('error_description', '')}")
    return TokenStore(account).store_grant(body)


__all__ = ["REFRESH_MARGIN_S", "TokenStore", "access_token", "device_flow", "loopback_flow", "provider_for"]

"""The one place the daemon opens IMAP sockets: TLS, authentication and clear errors.

Everything above this module receives a logged-in ``IMAPClient`` or a MailboxError whose message
says what failed and which config key to check.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable
from typing import Any

import structlog
from imapclient import IMAPClient
from imapclient import exceptions as imap_exc

from mailtriage.config import AccountConfig
from mailtriage.credentials import read_secret
from mailtriage.errors import MailboxError
from mailtriage.imap.namespace import server_folder

log = structlog.get_logger(__name__)

# Errors that mean "the connection is gone or unusable": the watcher reconnects on these.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # socket.error, TimeoutError, ssl.SSLError, ConnectionResetError
    imap_exc.IMAPClientAbortError,  # imaplib.IMAP4.abort: BYE, EOF, protocol desync
)


def ssl_context(account: AccountConfig) -> ssl.SSLContext:
    """Verification on by default; ``verify_tls = false`` is an explicit, logged opt-out."""
    where = f"accounts[{account.name!r}]"
    try:
        ctx = ssl.create_default_context(cafile=account.ca_file) if account.ca_file else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise MailboxError(f"{where}.ca_file = {account.ca_file!r} cannot be loaded as a PEM CA bundle: {exc}") from exc
    if not account.verify_tls:
        log.warning("tls_verification_disabled", account=account.name, host=account.host)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(account: AccountConfig, timeout: float = 30) -> IMAPClient:
    """A logged-in client for ``account``; raises MailboxError naming the cause and the fix."""
    where = f"accounts[{account.name!r}]"
    hostport = f"{account.host}:{account.port}"
    ctx = ssl_context(account) if account.tls != "none" else None
    try:
        client = IMAPClient(
            account.host,
            port=account.port,
            ssl=account.tls == "implicit",
            ssl_context=ctx,
            timeout=timeout,
        )
    except ssl.SSLError as exc:
        raise MailboxError(_tls_message(account, exc)) from exc
    except (OSError, imap_exc.IMAPClientError) as exc:
        raise MailboxError(
            f"cannot connect to {hostport}: {exc} — is the server running? check {where}.host/port "
            f"(and tls = {account.tls!r}: implicit TLS is usually port 993, STARTTLS/none port 143)"
        ) from exc
    # Aware datetimes for INTERNALDATE, so an APPENDed copy keeps exactly the original's time.
    client.normalise_times = False
    try:
        if account.tls == "starttls":
            try:
                client.starttls(ctx)
            except imap_exc.CapabilityError as exc:
                raise MailboxError(
                    f"{hostport} does not offer STARTTLS: set {where}.tls = \"implicit\" (port 993) if it "
                    "speaks TLS from the start, or \"none\" only on a trusted network"
                ) from exc
            except ssl.SSLError as exc:
                raise MailboxError(_tls_message(account, exc)) from exc
        _login(client, account)
    except BaseException:
        _close_quietly(client)
        raise
    cap_literals(client, account.max_message_bytes)
    log.info("imap_connected", account=account.name, host=account.host, port=account.port, tls=account.tls)
    return client


LITERAL_DRAIN_CHUNK = 1 << 20


def cap_literals(client: IMAPClient, limit: int) -> None:
    """Keep at most ``limit`` bytes of any literal the server sends; read and drop the rest.

    A partial fetch (``BODY.PEEK[]<0.N>``) is only a request: a broken or hostile server may answer
    with the whole 200 MB message, and imaplib would hold all of it (plus copies) in memory. Draining
    the excess in 1 MiB chunks keeps the connection in step with the server, so the next command
    still works. A truncated literal is exactly ``limit`` bytes long: callers that must copy a message
    byte for byte (the header action) compare its length with RFC822.SIZE and refuse a mismatch.
    """
    imap = client._imap  # imaplib.IMAP4: its _get_response reads each {size} literal via self.read
    read, store = imap.read, imap._append_untagged
    cut: list[int] = []  # the kept length of a literal just cut, until its line is stored

    def bounded_read(size: int) -> bytes:
        if size <= limit:
            return read(size)
        kept = read(limit)
        left = size - len(kept)
        while left > 0:
            chunk = read(min(left, LITERAL_DRAIN_CHUNK))
            if not chunk:
                raise imap_exc.IMAPClientAbortError(f"connection closed inside a {size}-byte literal")
            left -= len(chunk)
        log.warning("imap_literal_truncated", literal_bytes=size, kept_bytes=limit,
                    fix="the server sent more than was asked for; raise max_message_bytes only if this is real mail")
        cut.append(len(kept))
        return kept

    def append_untagged(typ: str, dat: Any) -> None:
        # imaplib stores (line ending in "{size}", literal); imapclient's parser checks that size
        # against the literal, so a cut literal gets the size it now has.
        if cut and isinstance(dat, tuple):
            line, data = dat
            dat = (re.sub(rb"\{\d+\}$", b"{%d}" % cut.pop(), line), data)
        store(typ, dat)

    imap.read, imap._append_untagged = bounded_read, append_untagged


def _tls_message(account: AccountConfig, exc: BaseException) -> str:
    where = f"accounts[{account.name!r}]"
    hint = (
        f"if the server uses a private CA set {where}.ca_file to its PEM bundle"
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate" in str(exc).lower()
        else f"check that {where}.tls = {account.tls!r} matches what port {account.port} speaks"
    )
    return f"TLS handshake with {account.host}:{account.port} failed: {exc}; {hint}"


def _login(client: IMAPClient, account: AccountConfig) -> None:
    where = f"accounts[{account.name!r}]"
    if account.oauth_provider:
        from mailtriage.imap import oauth

        secret = oauth.access_token(account)  # refreshed here when it expires within REFRESH_MARGIN_S
    else:
        secret = read_secret(account)
    source = (
        f"the token store {account.oauth_token_store!r} (`mailtriage auth {account.name}`)" if account.oauth_provider
        else f"password_file {account.password_file!r}" if account.password_file
        else f"environment variable {account.password_env}" if account.password_env
        else f"credential {account.password_credential!r}" if account.password_credential
        else "oauth_token_command" if account.oauth_token_command
        else f"oauth_token_file {account.oauth_token_file!r}"
    )
    try:
        if account.auth == "login":
            client.login(account.username, secret)
        elif account.auth == "plain":
            client.plain_login(account.username, secret)
        elif account.auth == "xoauth2":
            client.oauth2_login(account.username, secret)
        else:
            client.oauthbearer_login(account.username, secret)
    except imap_exc.LoginError as exc:
        raise MailboxError(
            f"login as {account.username!r} ({account.auth}) refused by server {account.host}:{account.port}: "
            f"{exc}. Check {source} and {where}.username"
            + ("; an OAuth token may have expired" if account.auth in ("xoauth2", "oauthbearer") else "")
        ) from exc
    except imap_exc.IMAPClientError as exc:
        if isinstance(exc, imap_exc.IMAPClientAbortError):
            raise
        raise MailboxError(
            f"authentication {account.auth!r} failed on {account.host}:{account.port}: {exc}. Does the server "
            f"offer it? Its capabilities: {_caps(client)}; change {where}.auth"
        ) from exc


def _caps(client: IMAPClient) -> str:
    try:
        return " ".join(c.decode() for c in client.capabilities())
    except Exception:  # only for an error message
        return "(unknown)"


def require_capabilities(client: IMAPClient, names: Iterable[str], why: str = "") -> None:
    """Fail fast when the server lacks a capability we rely on."""
    missing = [n for n in names if not client.has_capability(n)]
    if missing:
        raise MailboxError(
            f"the IMAP server lacks {', '.join(missing)}{' (needed ' + why + ')' if why else ''}; "
            f"it offers: {_caps(client)}"
        )


def check_folders(client: IMAPClient, folders: Iterable[str], account: str = "") -> None:
    """Every folder we may file into must exist: a missing one is a config error, said at start-up."""
    existing = {name for _flags, _delim, name in client.list_folders()}
    missing = sorted({f for f in folders if server_folder(client, f) not in existing})
    if missing:
        raise MailboxError(
            f"folder(s) {missing} do not exist on account {account!r}: create them in the mail server "
            f"(or fix [categories] / unsure_folder in the config). Existing folders: {sorted(existing)}"
        )


def took_new_mail(client: IMAPClient) -> bool:
    """Forget and report whether the server said ``* N EXISTS`` / ``RECENT`` since the last call.

    A server announces new mail in the reply to whatever command comes next (a FETCH, a MOVE),
    and only once: imaplib keeps such untagged replies in ``untagged_responses``, where nobody
    reads them, and an IDLE entered afterwards reports nothing new. The watcher checks here after
    its catch-up and catches up again instead of waiting for the next IDLE timeout. A SELECT
    (which imaplib starts by clearing that store) always reports EXISTS, so one after an action
    counts as new mail too: one more cheap SEARCH, never a missed message.
    """
    store = client._imap.untagged_responses
    seen = store.pop("EXISTS", None) is not None
    return store.pop("RECENT", None) is not None or seen


def close(client: IMAPClient | None) -> None:
    """Log out, or at least drop the socket; never raises (used on error paths)."""
    if client is not None:
        _close_quietly(client)


def _close_quietly(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


__all__ = [
    "CONNECTION_ERRORS",
    "cap_literals",
    "took_new_mail",
    "check_folders",
    "close",
    "connect",
    "require_capabilities",
    "ssl_context",
]

"""Reading an account's secret: the I/O the frozen config must not do.

The config names where a secret lives (``password_file``, ``password_env``, a systemd
``password_credential``, an ``oauth_token_command`` or ``oauth_token_file``); this module reads it
at the moment of use, so a rotated password is picked up on the next reconnect. OAuth tokens that
mailtriage keeps itself (``oauth_provider``) come from ``mailtriage.imap.oauth.access_token``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import structlog

from mailtriage.config import AccountConfig
from mailtriage.errors import ConfigError

log = structlog.get_logger(__name__)

# Warn once per file, not on every reconnect.
_WARNED_EXPOSED: set[str] = set()


def secret_file_exposure(path: str | os.PathLike[str]) -> str | None:
    """Why a secret file is readable by others ("world-readable", "group-readable"), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o007:
        return "world-readable" if mode & 0o004 else "accessible to other users"
    if mode & 0o070:
        return "group-readable" if mode & 0o040 else "accessible to its group"
    return None


def read_secret(account: AccountConfig) -> str:
    """The account's password or OAuth token, read now."""
    where = f"accounts[{account.name!r}]"
    if account.password_file or account.oauth_token_file:
        return _read_file(account, Path(account.password_file or account.oauth_token_file or ""))
    if account.password_env:
        value = os.environ.get(account.password_env)
        if not value:
            raise ConfigError(f"{where}: environment variable {account.password_env} is not set or empty")
        return value
    if account.password_credential:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise ConfigError(
                f"{where}: password_credential = {account.password_credential!r} but $CREDENTIALS_DIRECTORY "
                "is not set; add LoadCredential=... to the systemd unit or use password_file"
            )
        path = Path(cred_dir) / account.password_credential
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read credential {str(path)!r}: {exc.strerror}") from exc
    if account.oauth_token_command:
        return _run_token_command(where, account.oauth_token_command)
    if account.oauth_provider:
        raise ConfigError(f"{where}: oauth_provider tokens come from mailtriage.imap.oauth.access_token")
    raise ConfigError(f"{where}: no secret configured")  # unreachable after validation


def _read_file(account: AccountConfig, path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"accounts[{account.name!r}]: cannot read secret file {str(path)!r}: {exc.strerror}"
        ) from exc
    problem = secret_file_exposure(path)
    if problem and str(path) not in _WARNED_EXPOSED:
        _WARNED_EXPOSED.add(str(path))
        log.warning("secret_file_exposed", account=account.name, path=str(path), problem=problem,
                    fix=f"chmod 600 {path}")
    return text


def _run_token_command(where: str, command: str) -> str:
    # The command line may carry a client secret: no message here (nor a chained exception, whose
    # text repeats it) may contain it, nor its output.
    failure: str | None = None
    try:
        out = subprocess.run(command, shell=True, check=True, capture_output=True, text=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        failure = f"exited with status {exc.returncode}"
    except subprocess.TimeoutExpired:
        failure = "did not finish within 60 s"
    except (subprocess.SubprocessError, OSError) as exc:
        failure = f"could not be run ({type(exc).__name__})"
    if failure is not None:
        raise ConfigError(
            f"{where}: oauth_token_command {failure} (the command and its output are not shown: they "
            "may hold a secret). Run it by hand as the service user to see why"
        ) from None
    return out.stdout.strip()

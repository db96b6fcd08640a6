"""Who may use the console: the password hash file, the trusted reverse-proxy header, CSRF tokens and
the sign-in rate limit.

Hashes are scrypt from the standard library (no extra dependency, memory-hard): one
``user:scrypt$n$r$p$salt$hash`` line per person, written by ``mailtriage web --hash-password FILE``.
The limiter and the checks are pure (a clock is passed in), so they are tested without waiting.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from pathlib import Path

from mailtriage.errors import ConfigError

# scrypt cost: about 50 ms and 16 MiB per check on a small host; enough to make an offline guess slow.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_USER = re.compile(r"^[A-Za-z0-9._@+-]{1,64}$")
MAX_PASSWORD = 1024  # bytes; a longer one is refused before any hashing


def hash_password(password: str, *, salt: bytes | None = None, n: int = SCRYPT_N) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024)
    b64 = base64.b64encode
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _verify(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=64 * 1024 * 1024, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


# Checked against when the user is unknown, so a wrong name costs as long as a wrong password.
_DUMMY = hash_password("not a password", salt=b"\0" * 16)


def read_password_file(path: str | Path) -> dict[str, str]:
    """user -> stored hash. ConfigError when the file is missing, readable by others, or malformed."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"web.password_file {str(p)!r} cannot be read: {exc.strerror}. Write it with "
                          f"`mailtriage web --hash-password {p}`") from exc
    if mode & 0o077:
        raise ConfigError(f"web.password_file {str(p)!r} is readable by other users (mode {mode & 0o777:o}); "
                          f"run `chmod 600 {p}`")
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, stored = line.strip().partition(":")
        if not sep or not _USER.match(user) or not stored.startswith("scrypt$"):
            raise ConfigError(f"web.password_file {str(p)!r} line {number} is not 'user:scrypt$...'; write it with "
                              f"`mailtriage web --hash-password {p}`")
        users[user] = stored
    if not users:
        raise ConfigError(f"web.password_file {str(p)!r} has no users; add one with "
                          f"`mailtriage web --hash-password {p}`")
    return users


def write_password(path: str | Path, user: str, password: str) -> None:
    """Add or replace ``user``'s line in the password file (created 0600)."""
    if not _USER.match(user):
        raise ConfigError(f"user name {user!r}: use 1-64 letters, digits or . _ @ + -")
    if not password or len(password.encode()) > MAX_PASSWORD:
        raise ConfigError(f"the password must be 1..{MAX_PASSWORD} bytes long")
    p = Path(path)
    lines = []
    if p.exists():
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.partition(":")[0] != user]
    lines.append(f"{user}:{hash_password(password)}")
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, p)


def check_password(users: dict[str, str], user: str, password: str) -> bool:
    if len(password.encode()) > MAX_PASSWORD:
        return False
    stored = users.get(user)
    ok = _verify(password, stored if stored is not None else _DUMMY)
    return ok and stored is not None


def trusted_peer(peer: str | None, proxies: Iterable[str]) -> bool:
    """Whether ``peer`` (the TCP client address) is one of the configured reverse proxies."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    for proxy in proxies:
        try:
            if address in ipaddress.ip_network(proxy, strict=False):
                return True
        except ValueError:
            continue
    return False


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class LoginLimiter:
    """At most ``attempts`` failed sign-ins per client within ``window`` seconds; then refused until the
    oldest failure ages out. Bounded memory: the least recently failing clients are forgotten first."""

    def __init__(self, attempts: int, window: float, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10000) -> None:
        self.attempts, self.window, self.clock, self.max_clients = attempts, window, clock, max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str) -> deque[float]:
        now = self.clock()
        times = self._failures.get(client, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        times = self._recent(client)
        if len(times) < self.attempts:
            return 0.0
        return max(0.0, times[0] + self.window - self.clock())

    def failed(self, client: str) -> None:
        times = self._recent(client)
        times.append(self.clock())
        self._failures[client] = times
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

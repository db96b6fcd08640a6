"""What every throwaway IMAP server harness shares (``Dovecot``, ``Cyrus``): a master process of
our own on 127.0.0.1, its files under a root directory, started until it greets and always stopped.

A subclass says how to prepare its root, which command line starts it and which logs explain a
failure; the lifecycle (free port, greeting wait, stop by process group, restart on the same port,
cleanup at exit) and the logged-in client are written once here.
"""

from __future__ import annotations

import atexit
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, TypeVar

from imapclient import IMAPClient

from mailtriage.errors import MailboxError

_STOP_TIMEOUT_S = 5.0
_running: set[ImapServer] = set()

Self = TypeVar("Self", bound="ImapServer")


# Every port free_port() has handed out in this process. Binding port 0 and closing finds a port
# nothing uses now, and the kernel may hand the same one to the next call: a test that gives one
# port to a server meant to be down and the next to a server that is up then connects the two (a
# Postfix whose "down" milter port was its own smtpd port fed its own milter handshake to smtpd).
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that this process never handed out."""
    with _handed_out_lock:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise OSError("no free TCP port on 127.0.0.1 that was not handed out before (1000 tries)")


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _tails(logs: Sequence[Path]) -> str:
    return "".join(f"\n--- {path} ---\n{tail(path)}" for path in logs)


class ImapServer:
    """One server master on a free 127.0.0.1 port (or a fixed one), with its files under ``root``.

    Run as root, the server runs as ``nobody``; otherwise as the current user. ``root=None`` makes
    a temporary directory that ``stop()`` deletes; a given ``root`` is kept.
    """

    host = "127.0.0.1"
    name: ClassVar[str] = "the server"            # in messages: "Dovecot", "Cyrus"
    error: ClassVar[type[MailboxError]] = MailboxError
    start_timeout_s: ClassVar[float] = 10.0

    def __init__(self, root: Path | None, users: dict[str, str] | None, port: int | None) -> None:
        self._fixed_port = port
        self.users: dict[str, str] = dict(users) if users is not None else {"support": "secret"}
        for user, password in self.users.items():
            self._check_user(user, password)
        self._given_root = Path(root) if root is not None else None
        self._root: Path | None = self._given_root
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("nobody")
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
        else:
            self._uid, self._gid = os.geteuid(), os.getegid()
        self._user = pwd.getpwuid(self._uid).pw_name
        self._group = grp.getgrgid(self._gid).gr_name

    # -- what a subclass provides ---------------------------------------------------------------

    def _check_user(self, name: str, password: str) -> None:
        """Refuse a user name or password the server's user database cannot hold."""

    def _write_user(self, name: str, password: str) -> None:
        raise NotImplementedError

    def _users_ready(self) -> bool:
        """Whether the user database exists yet (else start() writes every user)."""
        return self._root is not None and self._root.is_dir()

    # -- state ------------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self._root is None:
            raise self.error(f"{self.name} has no root directory yet; call start() first")
        return self._root

    @property
    def port(self) -> int:
        if self._port is None or self._proc is None:
            raise self.error(f"{self.name} is not running; call start() (or use it as a context manager)")
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self.running else "stopped"
        return f"<{type(self).__name__} {where} root={self._root}>"

    # -- lifecycle --------------------------------------------------------------------------------

    def _drop_privileges(self) -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        return {"user": self._uid, "group": self._gid, "extra_groups": []}

    def _launch(self, argv: Sequence[str], port: int, output: Path, logs: Sequence[Path],
                env: dict[str, str] | None = None) -> None:
        """Start the master (its own process group, so stop() reaches its services too) and return
        once ``port`` greets with ``* OK``; else raise ``self.error`` with the tail of each log."""
        with open(output, "ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.root, env=env,
                start_new_session=True,
                **self._drop_privileges(),  # type: ignore[arg-type]
            )
        self._proc, self._port = proc, port
        deadline = time.monotonic() + self.start_timeout_s
        last = "no connection attempt yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._proc = None
                raise self.error(f"{self.name} exited with status {proc.returncode} while starting on port {port}."
                                 + _tails(logs))
            try:
                with socket.create_connection((self.host, port), timeout=1.0) as sock:
                    greeting = sock.recv(512)
                if greeting.startswith(b"* OK"):
                    return
                last = f"greeting {greeting[:80]!r}"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)  # polling a port that is not listening yet: nothing to wait on instead
        self.stop(_keep_root=True)
        raise self.error(
            f"{self.name} did not greet with '* OK' on {self.host}:{port} within {self.start_timeout_s:.0f} s "
            f"(last: {last})." + _tails(logs)
        )

    def _started(self: Self) -> Self:
        _running.add(self)
        return self

    def stop(self, *, _keep_root: bool = False) -> None:
        """SIGTERM to the master's process group, SIGKILL after 5 s; delete a temporary root."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is not None and proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)  # start_new_session made the master a group leader
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=_STOP_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            try:  # services that outlived their master (they share its process group)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._given_root is None and self._root is not None and not _keep_root:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def start(self: Self) -> Self:
        raise NotImplementedError

    def restart(self: Self) -> Self:
        """Stop the server and start it again on the same port with the same mail (an outage)."""
        port = self.port
        self.stop(_keep_root=True)
        self._fixed_port = port
        return self.start()

    def __enter__(self: Self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- users and clients ------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a user; works while running (the server reads a new user at their first login)."""
        self._check_user(name, password)
        self.users[name] = password
        if self._users_ready():  # else start() writes it
            self._write_user(name, password)

    def client(self, user: str = "support", password: str | None = None, timeout: float = 10.0) -> IMAPClient:
        """A logged-in plain-text IMAPClient; the caller logs it out."""
        if password is None:
            if user not in self.users:
                raise self.error(f"no user {user!r} on this server (have {sorted(self.users)}); call add_user first")
            password = self.users[user]
        client = IMAPClient(self.host, port=self.port, ssl=False, timeout=timeout)
        try:
            client.login(user, password)
        except Exception:
            client.shutdown()
            raise
        return client


@atexit.register
def _stop_leftovers() -> None:
    # A demo that crashes, or a test run interrupted hard, must not leave masters behind.
    for server in list(_running):
        server.stop()

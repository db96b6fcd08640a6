"""A real, throwaway, unprivileged Dovecot 2.3 IMAP server for tests and the demo.

Plain Python, importable without pytest: the test suite, the demo and the benchmarks all use it.
The pytest fixtures built on it live in tests/dovecot_fixtures.py.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from mailtriage.errors import MailboxError
from mailtriage.testing.imapserver import ImapServer, free_port

__all__ = [
    "DEFAULT_IMAP_CAPABILITY",
    "NO_IDLE",
    "NO_MOVE",
    "Dovecot",
    "DovecotError",
    "DovecotNotInstalledError",
    "imap_capability_without",
    "load_folder_tree",
    "load_messages",
]

INSTALL_HINT = "install it with `apt-get update && apt-get install -y dovecot-imapd`"

# Same as shared/reference/dovecot-test.conf (which lives outside the repository, so CI would not
# see it), with the port and the unprivileged user filled in at start and two speed settings added.
CONF_TEMPLATE = """\
# Throwaway, unprivileged Dovecot 2.3 instance written by mailtriage/testing/dovecot.py.
protocols = imap
listen = 127.0.0.1
base_dir = @ROOT@/run
state_dir = @ROOT@/state
log_path = @ROOT@/dovecot.log
instance_name = mailtriage-test
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# Non-root: every service runs as the user that started the master.
default_internal_user = @USER@
default_internal_group = @GROUP@
default_login_user = @USER@
first_valid_uid = 1
# Tests log in with wrong passwords on purpose; without this Dovecot's auth penalty would delay
# every later login from 127.0.0.1 by up to 15 s.
login_trusted_networks = 127.0.0.0/8
# Test mail is disposable: skip fsync so APPEND-heavy fixtures stay fast.
mail_fsync = never

# One passwd-file per user: Dovecot re-reads a changed passwd-file at most once per second, so a
# user added to a shared file right after a login would be unknown; a new file is always read.
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u @ROOT@/users/%u
}
userdb {
  driver = passwd-file
  args = username_format=%u @ROOT@/users/%u
  default_fields = uid=@USER@ gid=@GROUP@ home=@ROOT@/home/%u
}
mail_location = maildir:~/Maildir
namespace inbox {
  inbox = yes
  separator = /
  mailbox Archive {
    auto = create
  }
}
protocol imap {
  mail_max_userip_connections = 50
}
service imap-login {
  chroot =
  inet_listener imap {
    address = 127.0.0.1
    port = @PORT@
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  chroot =
}
service submission-login {
  chroot =
}
service anvil {
  chroot =
}
service stats {
  unix_listener stats-reader {
    mode = 0600
  }
  unix_listener stats-writer {
    mode = 0600
  }
}
"""

# What Dovecot 2.3.19 advertises after login with the config above. `imap_capability` replaces the
# whole list (a leading "+" can only add), so removing one capability means restating the rest.
DEFAULT_IMAP_CAPABILITY = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
    "NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES "
    "WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW "
    "STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE"
)


def imap_capability_without(*names: str) -> str:
    """The `extra_conf` line that makes Dovecot advertise its default capabilities minus `names`.

    Dovecot still executes the commands (e.g. MOVE) if a client sends them anyway; what changes is
    what CAPABILITY says, which is what a well-behaved client (imapclient's @require_capability) checks.
    """
    drop = {n.upper() for n in names}
    unknown = drop - {c.upper() for c in DEFAULT_IMAP_CAPABILITY.split()}
    if unknown:
        raise ValueError(
            f"capabilities {sorted(unknown)} are not in Dovecot's default list; "
            f"expected some of: {DEFAULT_IMAP_CAPABILITY}"
        )
    kept = [c for c in DEFAULT_IMAP_CAPABILITY.split() if c.upper() not in drop]
    return "imap_capability = " + " ".join(kept) + "\n"


NO_MOVE = imap_capability_without("MOVE")
NO_IDLE = imap_capability_without("IDLE")

# IMAPSieve "learn on move" (Pigeonhole, apt package dovecot-sieve), as in shared/reference/imapsieve:
# when a message is copied or moved into a folder matching @MAILBOXES@, pipe it to sieve-bin/learn.sh
# with the destination folder, the cause and the IMAP user. Cause COPY also fires on MOVE; the value
# MOVE is accepted by doveconf but makes Pigeonhole skip the rule silently.
IMAPSIEVE_CONF = """\
protocol imap {
  mail_plugins = $mail_plugins imap_sieve
}
plugin {
  sieve_plugins = sieve_imapsieve sieve_extprograms
  sieve_global_extensions = +vnd.dovecot.pipe +vnd.dovecot.environment
  sieve_pipe_bin_dir = @ROOT@/sieve-bin
  imapsieve_mailbox1_name = @MAILBOXES@
  imapsieve_mailbox1_causes = COPY
  imapsieve_mailbox1_before = file:@ROOT@/sieve/on-move.sieve
}
"""
ON_MOVE_SIEVE = """\
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];
if environment :matches "imap.mailbox" "*" { set "mailbox" "${1}"; }
if environment :matches "imap.cause" "*" { set "cause" "${1}"; }
if environment :matches "imap.user" "*" { set "user" "${1}"; }
pipe :copy "learn.sh" ["${mailbox}", "${cause}", "${user}"];
"""
# What learn.sh passes after `mailtriage learn --config FILE` (README's recipe has the same line):
# `--user=` and `--` keep a login or folder that starts with "-" (a folder named "--verbose") from
# being read as an option.
LEARN_HOOK_ARGS = '--user="$3" -- "$1" "$2"'
# OAuth2 (XOAUTH2 / OAUTHBEARER) logins checked by Dovecot's oauth2 passdb against a token
# introspection endpoint (RFC 7662, POST token=...; the answer names the user in "username").
# The passwd-file passdb stays first, so password logins keep working; a token is not a password
# there, and the chain continues to the oauth2 passdb.
OAUTH2_CONF = """\
auth_mechanisms = plain login xoauth2 oauthbearer
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = @ROOT@/dovecot-oauth2.conf.ext
}
"""
OAUTH2_EXT = """\
introspection_mode = post
introspection_url = @URL@
username_attribute = username
active_attribute = active
active_value = true
"""

SIEVE_INSTALL_HINT = "install Pigeonhole with `apt-get install -y dovecot-sieve` (it provides sievec)"

_APPENDUID_RE = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)


class DovecotError(MailboxError):
    """The test Dovecot could not be started, configured or fed with messages."""


class DovecotNotInstalledError(DovecotError):
    """The `dovecot` binary is missing on this machine."""


def _find_binary(name: str) -> str | None:
    # /usr/sbin is often not on a non-root user's PATH, yet that is where Debian puts dovecot.
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _check_passwd_field(value: str, what: str) -> None:
    bad = ":\n\r" + ("/ \t%" if what == "user name" else "")
    if not value or any(ch in value for ch in bad) or value.startswith("."):
        raise ValueError(
            f"{what} {value!r} cannot go into a passwd-file; expected a non-empty value without "
            f"{bad!r} that does not start with '.'"
        )


class Dovecot(ImapServer):
    """One Dovecot master on a free 127.0.0.1 port, with its config, mail and log under `root`.

    Run as root, the server runs as `nobody` (the config is written for an unprivileged master
    whose services all run as one user); otherwise it runs as the current user. `root=None` makes a temporary directory that
    `stop()` deletes; a given `root` is kept.
    """

    name = "Dovecot"
    error = DovecotError

    def __init__(
        self,
        root: Path | None = None,
        extra_conf: str = "",
        users: dict[str, str] | None = None,
        learn_script: str | None = None,
        learn_mailboxes: str = "Support/*",
        oauth2_introspection_url: str | None = None,
        port: int | None = None,
    ) -> None:
        """``learn_script``: the text of an executable (e.g. ``#!/bin/sh ...``) that IMAPSieve runs with
        the message on stdin and arguments MAILBOX CAUSE USER whenever a message is copied or moved
        into a folder matching ``learn_mailboxes``; it runs as the server user. Needs dovecot-sieve.

        ``oauth2_introspection_url``: also accept XOAUTH2/OAUTHBEARER logins, valid when that endpoint
        answers ``{"active": true, "username": USER}`` for the token (USER must exist in ``users``).

        ``port``: listen there instead of on a free port (a daemon configured before the server
        exists, or a restart on the same address); `restart()` keeps whichever port it had."""
        self.oauth2_introspection_url = oauth2_introspection_url
        self.extra_conf = extra_conf
        self.learn_script = learn_script
        self.learn_mailboxes = learn_mailboxes
        super().__init__(root, users, port)

    def _check_user(self, name: str, password: str) -> None:
        _check_passwd_field(name, "user name")
        _check_passwd_field(password, "password")

    def _users_ready(self) -> bool:
        return self._root is not None and (self._root / "users").is_dir()

    # -- properties ---------------------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Dovecot:
        """Write the config, start `dovecot -F` and return once the port greets with `* OK`."""
        if self.running:
            return self
        binary = _find_binary("dovecot")
        if binary is None:
            raise DovecotNotInstalledError(
                f"the `dovecot` binary was not found on PATH or in /usr/sbin; the IMAP tests need a "
                f"real Dovecot 2.3: {INSTALL_HINT}"
            )
        self._prepare_root()
        last_error: DovecotError | None = None
        # A free port can be taken between our probe and Dovecot's bind; retry on a new one.
        for _attempt in range(3):
            try:
                self._spawn(binary)
                break
            except DovecotError as exc:
                last_error = exc
                if "Address already in use" not in str(exc) or self._fixed_port is not None:
                    raise
        else:
            assert last_error is not None
            raise last_error
        return self._started()

    def _prepare_root(self) -> None:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="mailtriage-dovecot-"))
        root = self._root
        self._check_reachable(root)
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("home", "users"):
            (root / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for path in (root, root / "home", root / "users"):
                os.chown(path, self._uid, self._gid)
        for name, password in self.users.items():
            self._write_user(name, password)
        if self.learn_script is not None:
            for sub in ("sieve", "sieve-bin"):
                (root / sub).mkdir(exist_ok=True)
                if os.geteuid() == 0:
                    os.chown(root / sub, self._uid, self._gid)
            self._write_owned(root / "sieve" / "on-move.sieve", ON_MOVE_SIEVE.encode())
            self._write_owned(root / "sieve-bin" / "learn.sh", self.learn_script.encode())
            os.chmod(root / "sieve-bin" / "learn.sh", 0o700)

    def _compile_sieve(self) -> None:
        sievec = _find_binary("sievec")
        if sievec is None:
            raise DovecotNotInstalledError(f"learn_script needs Pigeonhole, but `sievec` was not found: {SIEVE_INSTALL_HINT}")
        script = self.root / "sieve" / "on-move.sieve"
        done = subprocess.run(
            [sievec, "-c", str(self.conf_path), str(script)],
            capture_output=True, text=True, cwd=self.root, **self._drop_privileges(),  # type: ignore[arg-type]
        )
        if done.returncode != 0:
            raise DovecotError(
                f"sievec could not compile {script} (status {done.returncode}): {done.stderr.strip()}; "
                f"is dovecot-sieve installed? {SIEVE_INSTALL_HINT}"
            )

    def _check_reachable(self, root: Path) -> None:
        # The server user must traverse every parent (pytest's tmp_path under root is 0700).
        if os.geteuid() != 0:
            return
        for parent in reversed(root.resolve().parents):
            st = parent.stat()
            if st.st_uid != self._uid and not st.st_mode & stat.S_IXOTH:
                raise DovecotError(
                    f"Dovecot runs as {self._user!r} but cannot enter {parent} (mode "
                    f"{stat.filemode(st.st_mode)}, owner uid {st.st_uid}); pass a root under a "
                    f"world-traversable directory such as /tmp, or root=None for a fresh temp dir"
                )

    def _write_conf(self, port: int) -> None:
        text = (
            CONF_TEMPLATE.replace("@ROOT@", str(self.root))
            .replace("@USER@", self._user)
            .replace("@GROUP@", self._group)
            .replace("@PORT@", str(port))
        )
        if self.oauth2_introspection_url is not None:
            text += "\n# oauth2_introspection_url\n" + OAUTH2_CONF.replace("@ROOT@", str(self.root))
            self._write_owned(self.root / "dovecot-oauth2.conf.ext",
                              OAUTH2_EXT.replace("@URL@", self.oauth2_introspection_url).encode())
        if self.learn_script is not None:
            text += "\n# learn_script: IMAPSieve\n" + IMAPSIEVE_CONF.replace("@ROOT@", str(self.root)).replace(
                "@MAILBOXES@", self.learn_mailboxes
            )
        if self.extra_conf:
            text += "\n# extra_conf\n" + self.extra_conf.rstrip("\n") + "\n"
        self._write_owned(self.conf_path, text.encode())
        if self.learn_script is not None:
            self._compile_sieve()

    def _write_user(self, name: str, password: str) -> None:
        self._write_owned(self.root / "users" / name, f"{name}:{{PLAIN}}{password}::::::\n".encode())

    def _write_owned(self, path: Path, data: bytes) -> None:
        # Replace atomically: the auth process must never read half a file.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        tmp.write_bytes(data)
        if os.geteuid() == 0:
            os.chown(tmp, self._uid, self._gid)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def _spawn(self, binary: str) -> None:
        port = self._fixed_port if self._fixed_port is not None else free_port()
        self._write_conf(port)
        stderr_path = self.root / "dovecot.stderr"
        stderr_path.write_bytes(b"")
        # -F keeps the master in the foreground, so the process started *is* the master.
        self._launch([binary, "-c", str(self.conf_path), "-F"], port, stderr_path, [stderr_path, self.log_path])

# -- loading mail -----------------------------------------------------------------------------

MessageSource = bytes | os.PathLike[str]


def _raw_messages(messages: Iterable[MessageSource] | MessageSource) -> Iterator[bytes]:
    if isinstance(messages, (bytes, bytearray, memoryview, os.PathLike)):
        messages = [messages]  # type: ignore[list-item]
    for item in messages:  # type: ignore[union-attr]
        if isinstance(item, (bytes, bytearray, memoryview)):
            yield bytes(item)
        elif isinstance(item, os.PathLike):
            path = Path(item)
            if path.is_dir():
                for child in sorted(path.iterdir()):
                    if child.is_file() and not child.name.startswith("."):
                        yield child.read_bytes()
            elif path.is_file():
                yield path.read_bytes()
            else:
                raise DovecotError(f"message source {path} does not exist; expected a file or a directory of files")
        else:
            raise TypeError(
                f"a message must be raw bytes or a pathlib.Path (file or directory), got {type(item).__name__}; "
                f"wrap a file name in Path(...)"
            )


def load_messages(
    target: IMAPClient | Dovecot,
    folder: str,
    messages: Iterable[MessageSource] | MessageSource,
    flags: Iterable[bytes | str] = (),
    create: bool = True,
) -> list[int]:
    """APPEND raw messages (bytes, .eml files, or every file in a directory) to `folder`; return their UIDs.

    Given a Dovecot, it logs in as "support" for the duration. Dovecot stores bare-LF messages as
    they come but FETCH returns CRLF line endings.
    """
    if isinstance(target, Dovecot):
        client = target.client()
        try:
            return load_messages(client, folder, messages, flags=flags, create=create)
        finally:
            client.logout()
    client = target
    flags = tuple(flags)
    if not client.folder_exists(folder):
        if not create:
            raise DovecotError(f"folder {folder!r} does not exist; pass create=True or create it first")
        client.create_folder(folder)
    uidplus = client.has_capability("UIDPLUS")
    uidnext = None if uidplus else int(client.folder_status(folder, [b"UIDNEXT"])[b"UIDNEXT"])
    uids: list[int] = []
    for n, raw in enumerate(_raw_messages(messages)):
        try:
            response = client.append(folder, raw, flags=flags)
        except IMAPClientError as exc:
            raise DovecotError(f"APPEND of message #{n} ({len(raw)} bytes) to {folder!r} failed: {exc}") from exc
        match = _APPENDUID_RE.search(response)
        if match:
            uids.append(int(match.group(2)))
    if uidnext is not None:
        # No UIDPLUS: the new messages are those at or above the UIDNEXT seen before appending.
        client.select_folder(folder, readonly=True)
        uids = sorted(u for u in client.search(["UID", f"{uidnext}:*"]) if u >= uidnext)
    return uids


def load_folder_tree(
    dovecot: Dovecot, root_dir: Path, prefix: str = "", user: str = "support"
) -> dict[str, int]:
    """Create folder `prefix + name` for each sub-directory of `root_dir` and load its files into it."""
    root_dir = Path(root_dir)
    subdirs = sorted(p for p in root_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if root_dir.is_dir() else []
    if not subdirs:
        raise DovecotError(
            f"{root_dir} has no sub-folders; expected one sub-folder per category holding raw messages"
        )
    counts: dict[str, int] = {}
    client = dovecot.client(user)
    try:
        for sub in subdirs:
            folder = prefix + sub.name
            counts[folder] = len(load_messages(client, folder, sub))
    finally:
        client.logout()
    return counts

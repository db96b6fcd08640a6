"""A real, throwaway Cyrus IMAP 3.6 server for tests: the second IMAP server of the suite.

Dovecot (mailtriage.testing.dovecot) puts folders at the top with "/" between levels; this Cyrus
keeps Debian's configuration of it, the "." separator with every personal folder under "INBOX."
(``altnamespace: no``, ``unixhierarchysep: no``, as Debian's /etc/imapd.conf ships; Cyrus 3's own
defaults are the opposite). That hierarchy is what Courier and many hosted servers use too, and
what a config written for Dovecot must survive.

Binaries: cyrus-imapd conflicts with dovecot-imapd as a Debian package, so `make deps` unpacks
cyrus-imapd, cyrus-common and sasl2-bin with ``apt-get download`` + ``dpkg -x`` into
/opt/mailtriage-cyrus (``MAILTRIAGE_CYRUS_DIR`` overrides; an installed cyrus-imapd is used when
present). Nothing is installed or started system-wide.

Authentication, test-only: users live in a private sasldb under the server's temp dir, written
with ``saslpasswd2`` (``sasl_pwcheck_method: auxprop``, plaintext LOGIN over 127.0.0.1 without
TLS). No saslauthd, no system accounts. INBOX is created at a user's first login
(``autocreate_quota: 0``, Debian's setting), so adding a user is one sasldb entry.

Privileges: run as root, the master and every service run as ``nobody`` (``cyrus_user``);
otherwise as the current user. Cyrus logs through syslog(3) only; the master's own stdout and
stderr go to ``master.log`` under the root. Plain Python, importable without pytest; the fixtures
are in tests/cyrus_fixtures.py.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path


from mailtriage.errors import MailboxError
from mailtriage.testing.dovecot import _check_passwd_field
from mailtriage.testing.imapserver import ImapServer, free_port

__all__ = ["CYRUS_DIR_ENV", "Cyrus", "CyrusError", "CyrusNotInstalledError", "cyrus_dir"]

CYRUS_DIR_ENV = "MAILTRIAGE_CYRUS_DIR"
DEFAULT_CYRUS_DIR = Path("/opt/mailtriage-cyrus")
INSTALL_HINT = (
    "run `sudo make deps` (it unpacks cyrus-imapd, cyrus-common and sasl2-bin into /opt/mailtriage-cyrus "
    "with apt-get download + dpkg -x, since cyrus-imapd conflicts with the installed dovecot-imapd), or "
    f"point {CYRUS_DIR_ENV} at such a tree"
)
REALM = "cyrus.test"  # servername, and the realm of every sasldb entry (they must agree)

IMAPD_CONF = """\
# Throwaway Cyrus IMAP written by mailtriage/testing/cyrus.py.
servername: @REALM@
configdirectory: @ROOT@/conf
defaultpartition: default
partition-default: @ROOT@/spool
sievedir: @ROOT@/sieve
proc_path: @ROOT@/run/proc
mboxname_lockpath: @ROOT@/run/lock
# imapd binds its end of the IDLE channel at configdirectory/socket/idle.PID, whatever idlesocket says.
idlesocket: @ROOT@/conf/socket/idle
notifysocket: @ROOT@/conf/socket/notify
lmtpsocket: @ROOT@/conf/socket/lmtp
syslog_prefix: mailtriage-cyrus
cyrus_user: @USER@
# Debian's hierarchy: "." between levels, personal folders under "INBOX." (the point of this server).
altnamespace: no
unixhierarchysep: no
# INBOX is created at a user's first login, as on Debian.
autocreate_quota: 0
# Test-only authentication: a private sasldb, plaintext LOGIN on 127.0.0.1 without TLS.
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: @ROOT@/sasldb2
sasl_mech_list: PLAIN LOGIN
"""

# Every command names the config: the master does not pass its -C on to the services it starts.
# idled pushes new mail to IDLE clients at once; without it imapd only re-checks every imapidlepoll
# (60 s) seconds.
CYRUS_CONF = """\
START {
  recover cmd="@BIN@/ctl_cyrusdb -C @ROOT@/imapd.conf -r"
}
SERVICES {
  imap cmd="@BIN@/imapd -C @ROOT@/imapd.conf" listen="127.0.0.1:@PORT@" prefork=0
}
EVENTS {
}
DAEMON {
@IDLED@}
"""
IDLED_LINE = '  idled cmd="@BIN@/idled -C @ROOT@/imapd.conf"\n'



class CyrusError(MailboxError):
    """The test Cyrus could not be found, configured or started."""


class CyrusNotInstalledError(CyrusError):
    """No Cyrus IMAP binaries (master, imapd, saslpasswd2) on this machine."""


def cyrus_dir() -> Path:
    """Where Cyrus is: ``$MAILTRIAGE_CYRUS_DIR``, /opt/mailtriage-cyrus, or "/" for an installed one."""
    given = os.environ.get(CYRUS_DIR_ENV)
    if given:
        return Path(given)
    if (DEFAULT_CYRUS_DIR / "usr/lib/cyrus/bin/master").is_file():
        return DEFAULT_CYRUS_DIR
    return Path("/")


class Cyrus(ImapServer):
    """One Cyrus master on a free 127.0.0.1 port, with config, sasldb and spool under `root`.

    The same surface as ``Dovecot`` (host, port, client, add_user, restart, stop), so a test or the
    kill proof can take either. `root=None` makes a temporary directory that `stop()` deletes.
    """

    name = "Cyrus"
    error = CyrusError
    start_timeout_s = 15.0

    def __init__(
        self,
        root: Path | None = None,
        users: dict[str, str] | None = None,
        *,
        idled: bool = True,
        extra_conf: str = "",
        port: int | None = None,
        install_dir: Path | None = None,
    ) -> None:
        """``idled``: run Cyrus's idled, so IDLE reports new mail at once (False: imapd's own poll).
        ``extra_conf``: lines appended to imapd.conf."""
        self.idled = idled
        self.extra_conf = extra_conf
        self.install_dir = Path(install_dir) if install_dir is not None else cyrus_dir()
        super().__init__(root, users, port)

    def _check_user(self, name: str, password: str) -> None:
        _check_user(name, password)

    # -- paths and state -------------------------------------------------------------------------

    @property
    def bin_dir(self) -> Path:
        return self.install_dir / "usr/lib/cyrus/bin"

    @property
    def log_path(self) -> Path:
        return self.root / "master.log"

    def _env(self) -> dict[str, str]:
        # The unpacked libcyrus*.so are not in the loader's path; the system's libraries are.
        libs = [str(self.install_dir / "usr/lib/x86_64-linux-gnu"), str(self.install_dir / "usr/lib")]
        if os.environ.get("LD_LIBRARY_PATH"):
            libs.append(os.environ["LD_LIBRARY_PATH"])
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_LIBRARY_PATH": ":".join(libs)}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Cyrus:
        """Write the config and users, start the master, return once the port greets with `* OK`."""
        if self.running:
            return self
        for needed in (self.bin_dir / "master", self.bin_dir / "imapd", self._saslpasswd2()):
            if not needed.is_file():
                raise CyrusNotInstalledError(f"{needed} is missing; the Cyrus tests need Cyrus IMAP 3.6: {INSTALL_HINT}")
        self._prepare_root()
        for _attempt in range(3):  # a free port can be taken between our probe and the bind
            try:
                self._spawn()
                break
            except CyrusError as exc:
                if "did not greet" not in str(exc) or self._fixed_port is not None or _attempt == 2:
                    raise
        return self._started()

    def _saslpasswd2(self) -> Path:
        return self.install_dir / "usr/sbin/saslpasswd2"

    def _prepare_root(self) -> None:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="mailtriage-cyrus-"))
            os.chmod(self._root, 0o755)  # the server user must enter it
        root = self._root
        for sub in ("", "conf", "conf/socket", "spool", "sieve", "run", "run/proc", "run/lock"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(root / sub, self._uid, self._gid)
        for name, password in self.users.items():
            self._write_user(name, password)

    def _write_conf(self, port: int) -> None:
        fill = {"@ROOT@": str(self.root), "@USER@": self._user, "@REALM@": REALM, "@BIN@": str(self.bin_dir),
                "@PORT@": str(port), "@IDLED@": IDLED_LINE if self.idled else ""}
        imapd, cyrus = IMAPD_CONF + (self.extra_conf.rstrip("\n") + "\n" if self.extra_conf else ""), CYRUS_CONF
        for _round in range(2):  # IDLED_LINE brings placeholders of its own
            for key, value in fill.items():
                imapd, cyrus = imapd.replace(key, value), cyrus.replace(key, value)
        for name, text in (("imapd.conf", imapd), ("cyrus.conf", cyrus)):
            path = self.root / name
            path.write_text(text)
            if os.geteuid() == 0:
                os.chown(path, self._uid, self._gid)

    def _write_user(self, name: str, password: str) -> None:
        done = subprocess.run(
            [str(self._saslpasswd2()), "-p", "-c", "-f", str(self.root / "sasldb2"), "-u", REALM, name],
            input=password.encode(), capture_output=True, env=self._env(), cwd=self.root,
            **self._drop_privileges(),  # type: ignore[arg-type]
        )
        if done.returncode != 0:
            raise CyrusError(
                f"saslpasswd2 could not add user {name!r} to {self.root / 'sasldb2'} (status {done.returncode}): "
                f"{done.stderr.decode(errors='replace').strip()}; {INSTALL_HINT}"
            )

    def _spawn(self) -> None:
        port = self._fixed_port if self._fixed_port is not None else free_port()
        self._write_conf(port)
        # Cyrus logs to syslog; the master's own output is what a failed start leaves here.
        self._launch(
            [str(self.bin_dir / "master"), "-C", str(self.root / "imapd.conf"), "-M", str(self.root / "cyrus.conf"),
             "-p", str(self.root / "run" / "master.pid"), "-D"],
            port, self.log_path, [self.log_path], env=self._env(),
        )


def _check_user(name: str, password: str) -> None:
    _check_passwd_field(name, "user name")
    _check_passwd_field(password, "password")
    if "." in name or "@" in name:
        # With unixhierarchysep off a "." in a user name is a hierarchy level; "@" would name a realm.
        raise ValueError(f"user name {name!r}: Cyrus with the '.' separator needs a name without '.' or '@'")

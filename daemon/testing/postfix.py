"""A real, throwaway Postfix 3.x instance on 127.0.0.1 for tests and benchmarks, plus the SMTP sink
it delivers to, so what Postfix finally delivers can be inspected byte for byte.

The instance applies one of the recipes of docs/postfix/ (the files README.md shows) as is: the
content filter (main.cf and master.cf) or the milter (main-milter.cf); only the ports in them are
replaced by free ones. Its own base configuration relays every domain to an aiosmtpd sink
(`SmtpSink`) instead of delivering locally.

Privileges: Postfix's `master` refuses to run as anyone but root ("the master command is reserved
for the superuser"), so the master runs as root, and so does this module where it creates the
queue directories owned by the `postfix` user (as `postfix check` would). Every service the
master starts runs unprivileged, as the `postfix` user (mail_owner; the `unpriv` column of
master.cf is "-" throughout) and without chroot; nothing listens beyond 127.0.0.1. Plain Python,
importable without pytest.
"""

from __future__ import annotations

import atexit
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from mailtriage.errors import MailtriageError
from mailtriage.testing.imapserver import free_port

__all__ = [
    "RECIPE_DIR",
    "Delivered",
    "Postfix",
    "PostfixError",
    "PostfixNotInstalledError",
    "RECIPES",
    "SmtpSink",
    "apply_recipe",
]

INSTALL_HINT = (
    "install it with `DEBIAN_FRONTEND=noninteractive apt-get install -y postfix` (answer "
    "'No configuration': the tests write their own)"
)
RECIPE_DIR = Path(__file__).resolve().parents[2] / "docs" / "postfix"
# The ports the recipes are written for (config.example.toml's [smtp] listen_port / next_hop_port
# and [milter] listen_port).
RECIPE_FILTER_PORT = 10025
RECIPE_REINJECT_PORT = 10026
RECIPE_MILTER_PORT = 10027
# Each recipe's files in docs/postfix/, and the file of the instance's config each one extends.
RECIPES: dict[str, dict[str, str]] = {
    "content_filter": {"main.cf": "main.cf", "master.cf": "master.cf"},
    "milter": {"main-milter.cf": "main.cf"},
}
MAIL_OWNER = "postfix"

BASE_MAIN_CF = """\
# Throwaway Postfix written by mailtriage/testing/postfix.py: relays every domain to an SMTP sink.
compatibility_level = 3.6
queue_directory = @ROOT@/queue
data_directory = @ROOT@/data
mail_owner = @MAIL_OWNER@
setgid_group = postdrop
maillog_file = @ROOT@/maillog
maillog_file_prefixes = @ROOT@
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = mx.mailtriage.test
mydomain = mailtriage.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = example.com, example.org
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_alias_maps = texthash:@ROOT@/conf/virtual
# Final delivery: the sink transport of master.cf, to the SmtpSink.
default_transport = sink:[127.0.0.1]:@SINK_PORT@
relay_transport = sink:[127.0.0.1]:@SINK_PORT@
smtp_dns_support_level = disabled
biff = no
# A test waits on queue states; Postfix's defaults (minutes) would only slow a retry it flushes.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""

# Debian's stock master.cf, trimmed to what relaying needs, every service unchrooted (the queue
# lives in a temp dir the chroot would not contain). The public listener stands for port 25.
BASE_MASTER_CF = """\
127.0.0.1:@SMTPD_PORT@ inet n - n - - smtpd
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
# Stands for final delivery (local, virtual), which writes long lines as they are: without the
# override this SMTP client would break lines over 998 octets itself, and a test could not tell
# the recipe's folding from the harness's.
sink       unix  - - n -    - smtp
  -o smtp_line_length_limit=0
  -o disable_mime_output_conversion=yes
"""

# queue_directory's sub-directories: (name, group, mode); all owned by mail_owner.
_QUEUE_DIRS = [
    *((name, "root", 0o700) for name in ("active", "bounce", "corrupt", "defer", "deferred", "flush",
                                         "hold", "incoming", "private", "saved", "trace")),
    ("maildrop", "postdrop", 0o730),
    ("public", "postdrop", 0o710),
]
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 5.0
_running: set[Postfix] = set()


class PostfixError(MailtriageError):
    """The test Postfix could not be configured, started or queried."""


class PostfixNotInstalledError(PostfixError):
    """Postfix (its `master` daemon and `postfix` command) is missing on this machine."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def apply_recipe(text: str, filter_port: int, reinject_port: int, milter_port: int | None = None) -> str:
    """A recipe file's text with its ports (10025, 10026, 10027) replaced; nothing else changes.

    Raises PostfixError when the text names none of them: then the recipe moved away from the
    ports it documents, and a test applying it would silently test something else.
    """
    ports = {RECIPE_FILTER_PORT: filter_port, RECIPE_REINJECT_PORT: reinject_port}
    if milter_port is not None:
        ports[RECIPE_MILTER_PORT] = milter_port
    out, replaced = text, 0
    for documented, port in ports.items():
        out, n = re.subn(rf"\b{documented}\b", str(port), out)
        replaced += n
    if replaced == 0:
        raise PostfixError(
            f"the recipe names none of the ports {', '.join(map(str, ports))}; expected the content_filter "
            "or reinjection port of config.example.toml's [smtp] section, or its [milter] listen_port"
        )
    return out


@dataclass(frozen=True)
class Delivered:
    """One SMTP transaction the sink accepted: the envelope and the message bytes as received."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    received_at: float  # time.monotonic() when the sink accepted it (for latency measurements)


class SmtpSink:
    """An aiosmtpd server on 127.0.0.1 that accepts everything and records it: final delivery.

    Takes lines of any length (Postfix's own smtpd does too), so what arrives is what was sent.
    """

    host = "127.0.0.1"

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.received: list[Delivered] = []
        self._changed = threading.Condition()
        self._controller: Any = None

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                content = envelope.original_content if envelope.original_content is not None else envelope.content
                with sink._changed:
                    sink.received.append(Delivered(envelope.mail_from, tuple(envelope.rcpt_tos), bytes(content),
                                                   time.monotonic()))
                    sink._changed.notify_all()
                return "250 2.0.0 Ok: delivered"

        class LongLineSMTP(SMTP):
            line_length_limit = 64 << 20

        class SinkController(Controller):
            def factory(self) -> SMTP:
                return LongLineSMTP(self.handler, **self.SMTP_kwargs)

        self._controller = SinkController(Handler(), hostname=self.host, port=self.port,
                                          server_hostname="sink.mailtriage.test")
        self._controller.start()
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def wait_for(self, predicate: Callable[[list[Delivered]], bool], timeout: float = 20.0,
                 what: str = "the expected deliveries") -> list[Delivered]:
        """Block until ``predicate(received)`` holds; raises PostfixError naming ``what`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PostfixError(
                        f"the sink did not receive {what} within {timeout:.0f} s; it has "
                        f"{len(self.received)} transaction(s): {[(d.mail_from, d.rcpt_tos) for d in self.received]}"
                    )
                self._changed.wait(min(left, 0.5))
            return list(self.received)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _find(name: str, folders: Sequence[str]) -> str | None:
    for folder in folders:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


class Postfix:
    """One Postfix master with a recipe of docs/postfix/, its config, queue and log under a temp dir.

    ``recipe``: "content_filter" (or True, docs/postfix/main.cf + master.cf), "milter"
    (docs/postfix/main-milter.cf) or False (plain relaying, e.g. a benchmark baseline).
    ``filter_port``: where the content filter's `mailtriage` transport delivers (mailtriage's
    listen port); ``reinject_port``: its reinjection listener (mailtriage's next hop);
    ``milter_port``: where the milter recipe's smtpd_milters point. All default to free ports.
    ``recipe_edit`` rewrites a recipe file's text (name, text) -> text before it is applied, for a
    test that shows what a line of the recipe is for. ``virtual_aliases``: address -> targets.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        sink_port: int,
        *,
        filter_port: int | None = None,
        reinject_port: int | None = None,
        milter_port: int | None = None,
        recipe: bool | str = True,
        recipe_dir: Path = RECIPE_DIR,
        recipe_edit: Callable[[str, str], str] | None = None,
        virtual_aliases: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.sink_port = sink_port
        self.filter_port = filter_port if filter_port is not None else free_port()
        self.reinject_port = reinject_port if reinject_port is not None else free_port()
        self.milter_port = milter_port if milter_port is not None else free_port()
        self.smtpd_port = free_port()
        name = "content_filter" if recipe is True else None if recipe is False else recipe
        if name is not None and name not in RECIPES:
            raise PostfixError(f"unknown Postfix recipe {recipe!r}; expected one of {sorted(RECIPES)} or False")
        self.recipe = name
        self.recipe_dir = Path(recipe_dir)
        self.recipe_edit = recipe_edit
        self.virtual_aliases = {k: list(v) for k, v in (virtual_aliases or {}).items()}
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths ----------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self._root is None:
            raise PostfixError("Postfix has no root directory yet; call start() first")
        return self._root

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def log_path(self) -> Path:
        return self.root / "maillog"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        where = f"{self.host}:{self.smtpd_port}" if self.running else "stopped"
        return f"<Postfix {where} root={self._root}>"

    # -- configuration --------------------------------------------------------------------------

    def main_cf(self) -> str:
        """The complete main.cf: the base, then the recipe's main.cf lines (ports replaced) as is."""
        return self._fill(BASE_MAIN_CF) + self._recipe_for("main.cf")

    def master_cf(self) -> str:
        """The complete master.cf: the base, then the recipe's master.cf entries (ports replaced) as is."""
        return self._fill(BASE_MASTER_CF) + self._recipe_for("master.cf")

    def _recipe_for(self, target: str) -> str:
        if self.recipe is None:
            return ""
        return "".join("\n" + self._recipe_text(name)
                       for name, extends in RECIPES[self.recipe].items() if extends == target)

    def _recipe_text(self, name: str) -> str:
        path = self.recipe_dir / name
        try:
            text = path.read_text()
        except OSError as exc:
            raise PostfixError(f"cannot read the Postfix recipe {path}: {exc.strerror or exc}") from exc
        if self.recipe_edit is not None:
            text = self.recipe_edit(name, text)
        return apply_recipe(text, self.filter_port, self.reinject_port, self.milter_port)

    def _fill(self, template: str) -> str:
        values = {"@ROOT@": str(self._root), "@SINK_PORT@": str(self.sink_port),
                  "@SMTPD_PORT@": str(self.smtpd_port), "@MAIL_OWNER@": MAIL_OWNER}
        for key, value in values.items():
            template = template.replace(key, value)
        return template

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Postfix:
        """Write the config, create the queue, start `master` and return once
        the public listener greets with 220."""
        if self.running:
            return self
        master = _find("master", ["/usr/lib/postfix/sbin", "/usr/libexec/postfix"])
        if master is None:
            raise PostfixNotInstalledError(f"Postfix was not found (no `master` daemon binary): {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise PostfixError(
                "Postfix's master daemon runs only as root (its services then run as the unprivileged "
                "`postfix` user); run the Postfix tests as root, e.g. in a container or CI job"
            )
        try:
            pwd.getpwnam(MAIL_OWNER)
        except KeyError as exc:
            raise PostfixNotInstalledError(f"the {MAIL_OWNER!r} user is missing: {INSTALL_HINT}") from exc
        self._root = Path(tempfile.mkdtemp(prefix="mailtriage-postfix-"))
        os.chmod(self._root, 0o755)  # the postfix user reads the config and the alias table
        self.conf_dir.mkdir()
        (self.conf_dir / "main.cf").write_text(self.main_cf())
        (self.conf_dir / "master.cf").write_text(self.master_cf())
        (self.conf_dir / "virtual").write_text(
            "".join(f"{alias} {', '.join(targets)}\n" for alias, targets in self.virtual_aliases.items())
        )
        # Postfix re-reads a table file until it is over a second old (a writer may still be at
        # it), 300 ms a time: that was two seconds of every start. Nothing writes these any more.
        past = time.time() - 60
        for path in self.conf_dir.iterdir():
            os.utime(path, (past, past))
        self._make_queue()
        stderr_path = self.root / "master.stderr"
        with open(stderr_path, "wb") as stderr:
            # -d: keep the stdin/stdout/stderr given here, so a fatal error at start-up lands in
            # master.stderr instead of /dev/null. Its own session: its process group is every service.
            self._proc = subprocess.Popen([master, "-d", "-c", str(self.conf_dir)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        _running.add(self)
        deadline = time.monotonic() + _START_TIMEOUT_S
        last = "no connection attempt yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise PostfixError(f"Postfix's master exited with status {code} while starting.\n"
                                   f"--- {stderr_path} ---\n{_tail(stderr_path)}\n--- {self.log_path} ---\n"
                                   f"{_tail(self.log_path)}")
            try:
                with socket.create_connection((self.host, self.smtpd_port), timeout=2.0) as sock:
                    greeting = sock.recv(512)
                    sock.sendall(b"QUIT\r\n")
                if greeting.startswith(b"220"):
                    return self
                last = f"greeting {greeting[:80]!r}"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        self.stop(keep_root=True)
        raise PostfixError(f"Postfix did not greet with 220 on {self.host}:{self.smtpd_port} within "
                           f"{_START_TIMEOUT_S:.0f} s (last: {last}).\n--- {self.log_path} ---\n{_tail(self.log_path)}")

    def _make_queue(self) -> None:
        # What `postfix check` (post-install create-missing) creates, per /etc/postfix/postfix-files;
        # done here because that script takes ~2 s per instance, most of a test's time.
        owner = pwd.getpwnam(MAIL_OWNER).pw_uid
        try:
            postdrop = grp.getgrnam("postdrop").gr_gid
        except KeyError as exc:
            raise PostfixNotInstalledError(f"the 'postdrop' group is missing: {INSTALL_HINT}") from exc
        queue = self.root / "queue"
        queue.mkdir(mode=0o755)  # root-owned, as Postfix wants its queue_directory
        (queue / "pid").mkdir(mode=0o755)
        for name, gid, mode in _QUEUE_DIRS:
            path = queue / name
            path.mkdir()
            os.chown(path, owner, postdrop if gid == "postdrop" else 0)
            os.chmod(path, mode)
        data = self.root / "data"
        data.mkdir(mode=0o700)
        os.chown(data, owner, 0)

    def stop(self, *, keep_root: bool = False) -> None:
        """SIGTERM to the master (it passes it on to every service), SIGKILL to its group after 5 s;
        then delete the temp dir."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is not None and proc.poll() is None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if pgid is not None and pgid == proc.pid:  # a service that outlived its master
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._root is not None and not keep_root:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the queue ------------------------------------------------------------------------------

    def queue(self) -> list[dict[str, Any]]:
        """`postqueue -j`: one dict per queued message (queue_name, queue_id, recipients, ...)."""
        done = self._postqueue("-j")
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """`postqueue -f`: retry every deferred message now (instead of after the backoff)."""
        self._postqueue("-f")

    def wait_queue(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0,
                   what: str = "the expected queue state") -> list[dict[str, Any]]:
        """Poll `postqueue -j` until ``predicate(queue)`` holds; raises PostfixError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            queue = self.queue()
            if predicate(queue):
                return queue
            if time.monotonic() > deadline:
                raise PostfixError(f"Postfix's queue did not reach {what} within {timeout:.0f} s; it holds "
                                   f"{queue}.\n--- {self.log_path} ---\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def log_lines(self, pattern: str) -> list[str]:
        """Lines of the instance's maillog that match the regular expression ``pattern``."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        rx = re.compile(pattern)
        return [line for line in text.splitlines() if rx.search(line)]

    def _postqueue(self, *args: str) -> subprocess.CompletedProcess[str]:
        postqueue = _find("postqueue", ["/usr/sbin", "/usr/bin"])
        if postqueue is None:
            raise PostfixNotInstalledError(f"`postqueue` was not found: {INSTALL_HINT}")
        done = subprocess.run([postqueue, "-c", str(self.conf_dir), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise PostfixError(f"`postqueue -c {self.conf_dir} {' '.join(args)}` failed (status "
                               f"{done.returncode}): {done.stderr.strip()}")
        return done


@atexit.register
def _stop_leftovers() -> None:
    # An interrupted test run must not leave a root-owned master and its queue behind.
    for server in list(_running):
        server.stop()


def delayed_acks() -> int:
    """The kernel's count of ACKs it sent only when the delayed-ACK timer fired (TcpExt DelayedACKs):
    each one is a write that waited ~40 ms on a peer's Nagle algorithm. Read it in a network
    namespace of its own (``unshare --net``) so the count is one test's traffic alone."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")]
    names, values = lines[0], lines[1]
    return int(dict(zip(names, values))["DelayedACKs"])


def delayed_acks_in_namespace(child: str, repo: Path) -> int | None:
    """Run ``child`` (``"module:function"``, a function that prints ``DELAYED_ACKS N``) with
    ``python -c`` in a network namespace of its own and return N; None where that cannot be done
    here (not root, or no ``unshare``/``ip``)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or shutil.which("ip") is None:
        return None
    module, function = child.split(":")
    done = subprocess.run(
        [unshare, "--net", sys.executable, "-c", f"from {module} import {function}; {function}()"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    counts = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("DELAYED_ACKS ")]
    if done.returncode != 0 or not counts:
        raise PostfixError(f"the delayed-ACK child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return int(counts[0])

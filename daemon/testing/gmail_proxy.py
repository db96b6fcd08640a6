"""An IMAP proxy that makes a real Dovecot look like Gmail's labels, for testing action = "label":
no test server speaks X-GM-EXT-1, and Gmail itself cannot run in a test suite.

It sits between the client and Dovecot, passes every byte through unchanged, with three exceptions:

- CAPABILITY (the untagged response and the [CAPABILITY ...] code of the greeting and of LOGIN's
  OK) also lists X-GM-EXT-1;
- ``UID STORE uids +X-GM-LABELS[.SILENT] (L ...)`` becomes, for each message and label, a COPY of
  the message into folder L (created if missing), once: the message gets a keyword that records
  the label, and a message that has it already is not copied again, so adding a label twice
  changes nothing, as on Gmail. \\Inbox is the folder INBOX;
- ``UID STORE uids -X-GM-LABELS[.SILENT] (L)`` where L is the selected mailbox's label (\\Inbox for
  INBOX) flags the message \\Deleted and UID EXPUNGEs it: it leaves that mailbox, as on Gmail.
  Removing another label is answered NO (not emulated).

The label operations run on a second connection the proxy opens as the same user (it reads the
LOGIN command's credentials); the client's connection then sees the EXPUNGE at its next command,
as a Gmail client does. Only what mailtriage's label action uses is emulated: no X-GM-MSGID,
X-GM-THRID, X-GM-RAW, FETCH X-GM-LABELS or label listing. Plain text only (no STARTTLS, no TLS):
a test proxy on 127.0.0.1. Plain Python threads, importable without pytest.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

from imapclient import IMAPClient

__all__ = ["GMAIL_CAPABILITY", "GmailProxy", "LabelOp"]

GMAIL_CAPABILITY = b"X-GM-EXT-1"
_MAX_LINE = 1 << 20
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_CAP_UNTAGGED = re.compile(rb"^(\* CAPABILITY [^\r\n]*?)(\r\n)$", re.IGNORECASE)
_CAP_CODE = re.compile(rb"^(\S+ OK \[CAPABILITY [^\]\r\n]*)\]", re.IGNORECASE)
_STORE = re.compile(rb"^(\S+) UID STORE (\S+) ([+-])X-GM-LABELS(\.SILENT)? \((.*)\)\r\n$", re.IGNORECASE)
_LOGIN = re.compile(rb"^\S+ LOGIN (.*)\r\n$", re.IGNORECASE)
_SELECT = re.compile(rb"^\S+ (SELECT|EXAMINE) (.*)\r\n$", re.IGNORECASE)
_UNSELECT = re.compile(rb"^\S+ (CLOSE|UNSELECT)\r\n$", re.IGNORECASE)


@dataclass(frozen=True)
class LabelOp:
    """One label change the proxy carried out (or found already done), for a test to count."""

    user: str
    mailbox: str  # the selected mailbox the STORE named its UID in
    uid: int
    op: str  # "+" add, "-" remove
    label: str
    effect: str  # "copied", "already" (had the label: nothing done), "expunged", "absent" (no such UID)


def astrings(data: bytes) -> list[str]:
    """The IMAP atoms and quoted strings of ``data`` (no literals), unquoted: ``"a b" \\Inbox`` ->
    ['a b', '\\Inbox']."""
    out: list[str] = []
    i, n = 0, len(data)
    while i < n:
        c = data[i : i + 1]
        if c == b" ":
            i += 1
        elif c == b'"':
            i += 1
            buf = bytearray()
            while i < n and data[i : i + 1] != b'"':
                if data[i : i + 1] == b"\\" and i + 1 < n:
                    i += 1
                buf += data[i : i + 1]
                i += 1
            i += 1
            out.append(buf.decode("utf-8", "replace"))
        else:
            j = data.find(b" ", i)
            j = n if j < 0 else j
            out.append(data[i:j].decode("utf-8", "replace"))
            i = j
    return out


def label_marker(label: str) -> str:
    """The keyword that records "this message has label ``label``" on the Dovecot side."""
    return "gmlabel_" + hashlib.sha256(label.encode()).hexdigest()[:16]


def label_folder(label: str) -> str:
    return "INBOX" if label.lower() == "\\inbox" else label


def _mailbox_id(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


def with_gmail_capability(line: bytes) -> bytes:
    """A response line with X-GM-EXT-1 added to the capability list it carries, if it carries one."""
    if GMAIL_CAPABILITY in line.upper():
        return line
    m = _CAP_UNTAGGED.match(line)
    if m:
        return m.group(1) + b" " + GMAIL_CAPABILITY + m.group(2)
    m = _CAP_CODE.match(line)
    if m:
        return m.group(1) + b" " + GMAIL_CAPABILITY + line[m.end(1):]
    return line


def _units(stream: BinaryIO) -> Iterator[list[bytes]]:
    """Protocol units: a line, and when it ends in a literal {n}, the n bytes and the line's rest.
    Yields the pieces in order (line, literal, line, ...); stops at EOF."""
    while True:
        line = stream.readline(_MAX_LINE)
        if not line:
            return
        pieces = [line]
        while (m := _LITERAL.search(pieces[-1])) is not None:
            pieces.append(stream.read(int(m.group(1))))
            rest = stream.readline(_MAX_LINE)
            if not rest:
                break
            pieces.append(rest)
        yield pieces


class _Session:
    """One client connection and its upstream connection to Dovecot."""

    def __init__(self, proxy: GmailProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = socket.create_connection((proxy.upstream_host, proxy.upstream_port), timeout=None)
        self.write_lock = threading.Lock()
        self.user: str | None = None
        self.password: str | None = None
        self.selected: str | None = None
        self.side: IMAPClient | None = None

    def run(self) -> None:
        down = threading.Thread(target=self._server_to_client, name="gmail-proxy-down", daemon=True)
        down.start()
        try:
            self._client_to_server()
        finally:
            self.close()
            down.join(10)

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        side, self.side = self.side, None
        if side is not None:
            try:
                side.logout()
            except Exception:  # noqa: BLE001 - the test server may be gone already
                side.shutdown()

    def _to_client(self, data: bytes) -> None:
        with self.write_lock:
            self.client.sendall(data)

    def _server_to_client(self) -> None:
        try:
            with self.upstream.makefile("rb") as stream:
                for pieces in _units(stream):
                    pieces[0] = with_gmail_capability(pieces[0])
                    self._to_client(b"".join(pieces))
        except OSError:
            pass
        finally:
            try:
                self.client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _client_to_server(self) -> None:
        try:
            with self.client.makefile("rb") as stream:
                while True:
                    line = stream.readline(_MAX_LINE)
                    if not line:
                        return
                    store = _STORE.match(line)
                    if store is not None:
                        self._to_client(self._store(store))
                        continue
                    self._note(line)
                    self.upstream.sendall(line)
                    # A literal's bytes and the rest of the command follow as they are (the server's
                    # "+" for a synchronising literal goes back through the other thread).
                    while (m := _LITERAL.search(line)) is not None:
                        self.upstream.sendall(stream.read(int(m.group(1))))
                        line = stream.readline(_MAX_LINE)
                        if not line:
                            return
                        self.upstream.sendall(line)
        except OSError:
            pass

    def _note(self, line: bytes) -> None:
        """What the label emulation needs to know: who logged in, which mailbox is selected."""
        if (m := _LOGIN.match(line)) is not None and not _LITERAL.search(line):
            words = astrings(m.group(1))
            if len(words) == 2:
                self.user, self.password = words
        elif (m := _SELECT.match(line)) is not None and not _LITERAL.search(line):
            words = astrings(m.group(2))
            self.selected = words[0] if words else None
        elif _UNSELECT.match(line):
            self.selected = None

    def _side(self) -> IMAPClient:
        if self.side is None:
            if self.user is None or self.password is None:
                raise RuntimeError("the proxy saw no LOGIN command (AUTHENTICATE is not emulated)")
            side = IMAPClient(self.proxy.upstream_host, port=self.proxy.upstream_port, ssl=False, timeout=30)
            side.folder_encode = False  # names go on as the client wrote them (modified UTF-7 already)
            side.login(self.user, self.password)
            self.side = side
        return self.side

    def _store(self, m: re.Match[bytes]) -> bytes:
        tag = m.group(1)
        try:
            uids = [int(u) for u in m.group(2).split(b",")]
        except ValueError:
            return tag + b" NO [gmail_proxy] only UID lists are emulated, not ranges\r\n"
        labels = astrings(m.group(5))
        if self.selected is None:
            return tag + b" BAD [gmail_proxy] no mailbox selected\r\n"
        try:
            ops = [self._change(uid, m.group(3).decode(), label) for uid in uids for label in labels]
        except _Refused as exc:
            return tag + b" NO " + str(exc).encode() + b"\r\n"
        except Exception as exc:  # noqa: BLE001 - the client hears it as a refusal, as from Gmail
            return tag + b" NO [gmail_proxy] " + f"{type(exc).__name__}: {exc}".encode(errors="replace") + b"\r\n"
        self.proxy.record(ops)
        return tag + b" OK Success\r\n"

    def _change(self, uid: int, op: str, label: str) -> LabelOp:
        assert self.selected is not None and self.user is not None
        side = self._side()
        source = self.selected
        side.select_folder(source)
        flags = side.fetch([uid], ["FLAGS"]).get(uid)
        if flags is None or b"\\Deleted" in flags[b"FLAGS"]:
            return LabelOp(self.user, source, uid, op, label, "absent")  # Gmail: OK, nothing to change
        folder = label_folder(label)
        if op == "-":
            if _mailbox_id(folder) != _mailbox_id(source):
                raise _Refused("[gmail_proxy] only the selected mailbox's own label can be removed here")
            side.add_flags([uid], [b"\\Deleted"], silent=True)
            side.uid_expunge([uid])
            return LabelOp(self.user, source, uid, op, label, "expunged")
        marker = label_marker(label).encode()
        if marker in {f.lower() for f in flags[b"FLAGS"]} or _mailbox_id(folder) == _mailbox_id(source):
            return LabelOp(self.user, source, uid, op, label, "already")
        if not side.folder_exists(folder):
            side.create_folder(folder)  # Gmail creates a label on first use
        side.copy([uid], folder)
        side.add_flags([uid], [marker], silent=True)
        return LabelOp(self.user, source, uid, op, label, "copied")


class _Refused(Exception):
    pass


class GmailProxy:
    """``GmailProxy(dovecot.host, dovecot.port).start()``: listens on ``host:port`` (port 0 picks one)."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = port
        self.ops: list[LabelOp] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sessions: set[_Session] = set()
        self._thread: threading.Thread | None = None

    def record(self, ops: list[LabelOp]) -> None:
        with self._lock:
            self.ops.extend(ops)

    def start(self) -> GmailProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="gmail-proxy", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return  # closed by stop()
            try:
                session = _Session(self, client)
            except OSError:
                client.close()  # Dovecot is down: the client sees the connection close, as it would
                continue
            with self._lock:
                self._sessions.add(session)
            threading.Thread(target=self._serve, args=(session,), name="gmail-proxy-up", daemon=True).start()

    def _serve(self, session: _Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.discard(session)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
            except OSError:
                pass
            listener.close()
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> GmailProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def added(self, effect: str = "copied") -> list[LabelOp]:
        """The label additions with this effect, in order."""
        with self._lock:
            return [op for op in self.ops if op.op == "+" and op.effect == effect]

    def __repr__(self) -> str:
        return f"GmailProxy({self.host}:{self.port} -> {self.upstream_host}:{self.upstream_port})"

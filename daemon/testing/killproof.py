"""The SIGKILL proof: file a backlog in a real IMAP server (Dovecot, or Cyrus) while the worker
process is killed again and again, restart it each time, and count where every message ended up.

``run_proof`` drives it; ``python -m mailtriage.testing.killproof worker SPEC.json`` is the worker: one
MailboxWatcher over the spec's account with keyword rules for a model (the proof is about state and
IMAP, not inference). Kills are real ``SIGKILL``s of that process, at random times and at chosen
points: the worker kills itself right after an action, before its status is written ("action done,
status not written"), or right after the 'pending' row, before acting. The check reads the server
and the state DB: every message in exactly one folder, none lost, none duplicated, one decision each.
Used by tests/test_killproof.py (a few kills) and benchmarks/kill_proof.py (>= 20 kills, 1,000 messages).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
UNSURE_FOLDER = "Support/Unsure"
FOLDERS = ["INBOX", *CATEGORIES.values(), UNSURE_FOLDER]
_WORDS = {"invoice": "billing", "password": "login", "refund": "refunds"}
_SUBJECTS = ("Invoice {n} is wrong", "Password reset {n}", "Refund for order {n}", "Question {n}")
KILL_POINTS = ("after_act", "before_act", "random")


def message(n: int) -> bytes:
    subject = _SUBJECTS[n % len(_SUBJECTS)].format(n=n)
    return (
        f"From: Customer {n} <c{n}@example.com>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <kill-{n}@example.com>\r\nDate: Mon, 6 May 2024 07:08:09 +0200\r\n\r\n"
        f"Hello, {subject.lower()}.\r\n"
    ).encode()


# ---- the worker process --------------------------------------------------------------------------


def _worker(spec_path: str) -> int:
    import structlog

    from mailtriage.config import AccountConfig, Config, ModelConfig
    from mailtriage.imap.watcher import MailboxWatcher
    from mailtriage.store.state import StateDB
    from mailtriage.testing.fakes import KeywordClassifier

    spec = json.loads(Path(spec_path).read_text())
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    account = AccountConfig(
        name="acct", host=spec["host"], port=spec["port"], tls="none", username=spec["user"],
        password_file=spec["password_file"], action=spec["action"], fetch_batch=spec["fetch_batch"],
        reconnect_max=1, idle_timeout=30, label_archive=bool(spec.get("label_archive", False)),
    )
    config = Config(categories=CATEGORIES, unsure_folder=UNSURE_FOLDER, state_path=spec["state"],
                    accounts=(account,), model=ModelConfig(threshold=0.6))
    rules = KeywordClassifier(tuple(CATEGORIES), _WORDS, version="kw-proof", default="billing")
    delay = float(spec.get("classify_delay", 0.0))

    def classify(texts: Any) -> Any:  # keyword rules that take a model's time per message
        time.sleep(delay * len(texts))
        return rules(texts)

    watcher = MailboxWatcher(account, "INBOX", config, StateDB(spec["state"]), classify,
                             idle_slice=0.2, backoff_start=0.1)
    point, after = spec.get("kill_point"), int(spec.get("kill_after", 0))
    if point in ("after_act", "before_act"):
        real_act, calls = watcher.filing.act, [0]

        def act(*args: Any, **kwargs: Any) -> None:
            calls[0] += 1
            if point == "before_act" and calls[0] > after:
                os.kill(os.getpid(), signal.SIGKILL)  # 'pending' written, nothing done yet
            real_act(*args, **kwargs)
            if point == "after_act" and calls[0] > after:
                os.kill(os.getpid(), signal.SIGKILL)  # acted, status not written

        watcher.filing.act = act  # type: ignore[method-assign]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    watcher.run(stop)
    return 0


# ---- the driver ----------------------------------------------------------------------------------


@dataclass
class ProofResult:
    messages: int
    kills: int
    kills_by_point: dict[str, int]
    kills_while_filing: int
    dovecot_restarts: int
    lost: int
    duplicated: int
    left_in_inbox: int
    decisions_not_one: int
    pending_rows: int
    per_folder: dict[str, int]
    recoveries: dict[str, int]  # recovered_* events in the workers' logs: how each kill was finished
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.left_in_inbox or self.decisions_not_one or self.pending_rows)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _folder_ids(client: Any) -> dict[str, Counter[str]]:
    from mailtriage.imap.namespace import server_folder

    out: dict[str, Counter[str]] = {}
    for folder in FOLDERS:
        client.select_folder(server_folder(client, folder), readonly=True)
        uids = client.search(["UNDELETED"])
        ids: Counter[str] = Counter()
        for start in range(0, len(uids), 500):
            data = client.fetch(uids[start : start + 500], ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
            for d in data.values():
                raw = d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().strip()
                ids[raw.split(":", 1)[1].strip() if ":" in raw else raw] += 1
        out[folder] = ids
    return out


def _inbox_left(server: Any, user: str, password: str) -> int:
    client = server.client(user, password)
    try:
        return int(client.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"])
    finally:
        client.logout()


def _pending(state: Path) -> int:
    if not state.exists():
        return 0
    with sqlite3.connect(state, timeout=30) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM messages WHERE status='pending'").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def run_proof(
    server: Any, user: str, password: str, workdir: Path, *, messages: int = 60, kills: int = 3,
    action: str = "move", fetch_batch: int = 5, seed: int = 1, dovecot_restarts: int = 0,
    finish_timeout: float = 600.0, random_kill_s: tuple[float, float] = (0.3, 1.0), classify_delay: float = 0.01,
    log: Any = None, label_archive: bool = False,
) -> ProofResult:
    """Load ``messages`` into the user's INBOX and file them with ``kills`` SIGKILLs of the worker
    (cycling through KILL_POINTS; random times drawn from ``seed``) and ``dovecot_restarts`` server
    restarts mid-run, then let one worker finish and count. ``classify_delay`` seconds per message
    stand for a model's inference time, so the kills fall while there is still a backlog.
    ``server`` needs ``host``/``port`` (where the worker connects: a Dovecot, or a proxy in front of
    it such as testing/gmail_proxy.py for action = "label" with ``label_archive``) and ``client()``."""
    rng = random.Random(seed)
    started = time.monotonic()
    base = dict(_prepare(server, user, password, workdir, messages, action, fetch_batch), classify_delay=classify_delay,
                label_archive=label_archive)
    state = Path(base["state"])
    by_point: Counter[str] = Counter()
    while_filing = 0
    notes: list[str] = []
    restarts_left = dovecot_restarts
    for i in range(kills + 1):
        final = i == kills
        point = None if final else KILL_POINTS[i % len(KILL_POINTS)]
        spec = dict(base, kill_point=point, kill_after=rng.randint(0, 3 * fetch_batch))
        spec_path = workdir / f"spec-{i}.json"
        spec_path.write_text(json.dumps(spec))
        proc = _spawn(spec_path, workdir / f"worker-{i}.log")
        try:
            if restarts_left and not final and i % 2 == 1:
                # Once this worker has filed some of what is left, Dovecot goes down and comes back
                # on the same port: the worker must notice and reconnect by itself.
                left = _inbox_left(server, user, password)
                target = left - max(1, int(left * rng.uniform(0.1, 0.4)))
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and proc.poll() is None and _inbox_left(server, user, password) > target:
                    time.sleep(0.05)
                server.restart()
                restarts_left -= 1
            if final:
                deadline = time.monotonic() + finish_timeout
                while time.monotonic() < deadline and (_inbox_left(server, user, password) or _pending(state)):
                    if proc.poll() is not None:
                        notes.append(f"final worker exited with {proc.returncode}")
                        break
                    time.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
                continue
            if point == "random":
                time.sleep(rng.uniform(*random_kill_s))
            else:
                try:
                    proc.wait(rng.uniform(20.0, 40.0))  # kills itself at its point
                except subprocess.TimeoutExpired:
                    notes.append(f"kill {i} ({point}): point not reached in time, killed from outside")
            filing = _inbox_left(server, user, password) > 0
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            if proc.returncode == -signal.SIGKILL:
                by_point[point or "?"] += 1
                while_filing += int(filing)
            else:
                notes.append(f"worker {i} ended with {proc.returncode} instead of a SIGKILL")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        if log:
            log(f"kill {i}/{kills} point={point} inbox_left={_inbox_left(server, user, password)}")
    return _count(server, user, password, state, messages, started, by_point, while_filing,
                  dovecot_restarts - restarts_left, notes)


def run_two_workers(
    server: Any, user: str, password: str, workdir: Path, *, messages: int = 40, fetch_batch: int = 3,
    finish_timeout: float = 300.0,
) -> ProofResult:
    """Two worker processes on one mailbox and one state database at the same time (two
    `mailtriage serve` by mistake): the messages must still end up once each."""
    started = time.monotonic()
    base = _prepare(server, user, password, workdir, messages, "move", fetch_batch)
    state = Path(base["state"])
    procs = []
    for i in range(2):
        spec_path = workdir / f"spec-two-{i}.json"
        spec_path.write_text(json.dumps(dict(base, kill_point=None)))
        procs.append(_spawn(spec_path, workdir / f"worker-two-{i}.log"))
    notes: list[str] = []
    try:
        deadline = time.monotonic() + finish_timeout
        while time.monotonic() < deadline and (_inbox_left(server, user, password) or _pending(state)):
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            if proc.returncode != 0:
                notes.append(f"a worker ended with {proc.returncode}")
    return _count(server, user, password, state, messages, started, Counter(), 0, 0, notes)


def _prepare(server: Any, user: str, password: str, workdir: Path, messages: int, action: str,
             fetch_batch: int) -> dict[str, Any]:
    from mailtriage.imap.namespace import server_folder
    from mailtriage.testing.dovecot import load_messages

    workdir.mkdir(parents=True, exist_ok=True)
    pw = workdir / "password"
    pw.write_text(password)
    client = server.client(user, password)
    try:
        existing = {name for _f, _d, name in client.list_folders()}
        for folder in [server_folder(client, name) for name in FOLDERS[1:]]:  # as the server spells it
            if folder not in existing:
                client.create_folder(folder)
        for start in range(0, messages, 100):
            load_messages(client, "INBOX", [message(n) for n in range(start, min(messages, start + 100))])
    finally:
        client.logout()
    return {"host": server.host, "port": server.port, "user": user, "password_file": str(pw),
            "state": str(workdir / "state.sqlite3"), "action": action, "fetch_batch": fetch_batch}


def _spawn(spec_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "mailtriage.testing.killproof", "worker", str(spec_path)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def _recoveries(workdir: Path) -> dict[str, int]:
    events: Counter[str] = Counter()
    for log_path in sorted(workdir.glob("worker-*.log")):
        events.update(re.findall(r"\b(recovered_[a-z_]+)\b", log_path.read_text(errors="replace")))
    return dict(sorted(events.items()))


def _count(server: Any, user: str, password: str, state: Path, messages: int, started: float,
           by_point: Counter[str], while_filing: int, restarts: int, notes: list[str]) -> ProofResult:
    client = server.client(user, password)
    try:
        found = _folder_ids(client)
    finally:
        client.logout()
    expected = {f"<kill-{n}@example.com>" for n in range(messages)}
    total: Counter[str] = Counter()
    for ids in found.values():
        total.update(ids)
    lost = sum(1 for mid in expected if total[mid] == 0)
    duplicated = sum(max(0, total[mid] - 1) for mid in expected) + sum(n for mid, n in total.items() if mid not in expected)
    with sqlite3.connect(state) as conn:
        rows = conn.execute(
            "SELECT key, count(*) FROM messages WHERE status='done' AND action != 'none' GROUP BY key"
        ).fetchall()
        pending_rows = int(conn.execute("SELECT count(*) FROM messages WHERE status='pending'").fetchone()[0])
    decisions = {f"<{k}>" if not k.startswith("<") else k: n for k, n in rows}
    not_one = sum(1 for mid in expected if decisions.get(mid, 0) != 1)
    return ProofResult(
        messages=messages, kills=sum(by_point.values()), kills_by_point=dict(by_point), kills_while_filing=while_filing,
        dovecot_restarts=restarts, lost=lost, duplicated=duplicated,
        left_in_inbox=sum(found["INBOX"].values()), decisions_not_one=not_one, pending_rows=pending_rows,
        per_folder={f: sum(ids.values()) for f, ids in found.items()}, recoveries=_recoveries(state.parent),
        seconds=round(time.monotonic() - started, 1),
        notes=notes,
    )

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        raise SystemExit(_worker(sys.argv[2]))
    raise SystemExit("usage: python -m mailtriage.testing.killproof worker SPEC.json")

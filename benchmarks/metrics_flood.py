"""Idle connections to the metrics port while the daemon relays mail: what they hold, and whether a
scrape and a real SMTP delivery still get through.

    .venv/bin/python -m benchmarks.metrics_flood                 # 2,041 idle connections (the finding)
    .venv/bin/python -m benchmarks.metrics_flood --clients 300

The daemon runs as its own process, as `mailtriage serve` does: ``Service`` with the SMTP content
filter and ``metrics_port`` on, the keyword fake model (the model plays no part here), JSON logs,
under a 1,024 open-file limit. A real aiosmtpd next hop receives. The benchmark opens the idle
connections to the metrics port (never sending a byte), then reports the daemon's threads and
open files before and while they idle (the growth is the connections it holds), whether a scrape
answers, and whether a real message is relayed (and how long each took).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import select
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from benchmarks.common import ENV, REPO, loadavg, md_table, write_json
from mailtriage.testing.imapserver import free_port

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}


def _daemon_child(work: str, listen: int, hop_port: int, metrics_port: int) -> None:
    from mailtriage.cli.logs import configure_logging
    from mailtriage.config import Config, ModelConfig, SmtpConfig
    from mailtriage.core.labels import LabelSet
    from mailtriage.model import modeldir
    from mailtriage.service.app import Service
    from mailtriage.testing.fakes import KeywordClassifier

    configure_logging("info", json=True)
    models = Path(work) / "models"
    (models / "v1").mkdir(parents=True)
    LabelSet(tuple(CATEGORIES)).save(models / "v1")
    modeldir.promote(models, models / "v1")
    config = Config(
        categories=CATEGORIES, state_path=str(Path(work) / "state.sqlite3"),
        model=ModelConfig(path=str(models), device="cpu"), metrics_port=metrics_port,
        smtp=SmtpConfig(enabled=True, listen_host="127.0.0.1", listen_port=listen,
                        next_hop_host="127.0.0.1", next_hop_port=hop_port),
    )
    classifier = KeywordClassifier(tuple(CATEGORIES), {"invoice": "billing"}, version="v1")
    service = Service(config, None, load_model=lambda path: classifier)

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await service.ready.wait()
        print("READY", flush=True)
        await task

    asyncio.run(main())


class _Hop:
    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1
        return "250 2.0.0 Ok: queued"


def _mail() -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "customer@example.com", "support@example.com", "invoice"
    msg["Message-ID"] = f"<metrics-flood-{time.time_ns()}@example.com>"
    msg.set_content("Where is my invoice?")
    return msg.as_bytes()


def _deliver(port: int, timeout: float) -> tuple[bool, float, str]:
    started = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.bench", timeout=timeout) as client:
            client.sendmail("customer@example.com", ["support@example.com"], _mail())
        return True, time.monotonic() - started, ""
    except (smtplib.SMTPException, OSError) as exc:
        return False, time.monotonic() - started, f"{type(exc).__name__}: {exc}"


def _scrape(port: int, timeout: float) -> tuple[bool, float, str]:
    started = time.monotonic()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read()
        return b"mailtriage_messages" in body, time.monotonic() - started, ""
    except OSError as exc:
        return False, time.monotonic() - started, f"{type(exc).__name__}: {exc}"


def _proc(pid: int) -> tuple[int, int]:
    """(threads, open files) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def _flood(port: int, n: int, give_up_after: int = 20) -> tuple[list[socket.socket], int]:
    """Open up to ``n`` idle connections one after another; (connected, failed). Stops early once
    ``give_up_after`` connects in a row time out: the daemon has stopped accepting (out of files)."""
    connected: list[socket.socket] = []
    failed = in_a_row = 0
    for _ in range(n):
        try:
            connected.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            in_a_row = 0
        except OSError:
            failed += 1
            in_a_row += 1
            if in_a_row >= give_up_after:
                break
    return connected, n - len(connected)


def _still_open(socks: list[socket.socket]) -> int:
    """How many of these connections show no close (EOF or reset) on the client's side: held by the
    daemon, or still waiting in (or dropped from) the kernel's full accept queue."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    closed = {fd for fd, _ in poller.poll(0)}
    return sum(sock.fileno() not in closed for sock in socks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2041, help="idle connections to open (default 2041)")
    ap.add_argument("--nofile", type=int, default=1024, help="the daemon's open-file limit (default 1024)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to let the flood settle before measuring")
    ap.add_argument("--daemon-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.daemon_child:
        work, listen, hop_port, metrics_port = args.daemon_child
        _daemon_child(work, int(listen), int(hop_port), int(metrics_port))
        return

    from aiosmtpd.controller import Controller

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.clients * 2 + 512)), hard))
    hop_port, listen, metrics_port = free_port(), free_port(), free_port()
    hop = _Hop()
    controller = Controller(hop, hostname="127.0.0.1", port=hop_port, server_hostname="nexthop.bench")
    controller.start()
    work = tempfile.mkdtemp(prefix="mt-bench-metrics-flood-")
    log_path = Path(work) / "daemon.log"

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, max(args.nofile, hard)))

    with log_path.open("wb") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.metrics_flood", "--daemon-child", work, str(listen), str(hop_port),
             str(metrics_port)],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=log_file, preexec_fn=limit_files,
        )
    result: dict[str, Any] = {"clients": args.clients, "daemon_nofile": args.nofile, "load_before": loadavg()}
    idle: list[socket.socket] = []
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"READY":
            raise SystemExit(f"the daemon did not start; its log: {log_path}")
        warm = _scrape(metrics_port, 10)[0] and _deliver(listen, 30)[0]  # start what a scrape and a delivery start
        threads_before, fds_before = _proc(child.pid)
        idle, connect_failed = _flood(metrics_port, args.clients)
        # Waiting on the flood itself: nothing to poll for but the clock (a benchmark, not a test).
        time.sleep(args.settle)
        threads_idle, fds_idle = _proc(child.pid)
        not_closed = _still_open(idle)
        scrape_ok, scrape_s, scrape_err = _scrape(metrics_port, 30)
        mail_ok, mail_s, mail_err = _deliver(listen, 60)
        result.update(
            warm_up_ok=warm, connect_failed=connect_failed, daemon_threads_before=threads_before,
            daemon_threads_while_idle=threads_idle, daemon_fds_before=fds_before, daemon_fds_while_idle=fds_idle,
            connections_held_by_daemon=fds_idle - fds_before, connections_not_closed_seen_by_clients=not_closed,
            scrape_ok=scrape_ok, scrape_seconds=round(scrape_s, 2),
            scrape_error=scrape_err, mail_delivered=mail_ok, mail_seconds=round(mail_s, 2), mail_error=mail_err,
            next_hop_received=hop.received,
        )
    finally:
        for sock in idle:
            sock.close()
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        controller.stop()
    events: dict[str, int] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line).get("event", "?")
        except ValueError:
            event = "(not json)"
        events[event] = events.get(event, 0) + 1
    result.update(daemon_log_events=events, load_after=loadavg())
    write_json("metrics_flood", result)
    print(json.dumps(result, indent=2))
    print(md_table(
        ["idle conns opened", "held by daemon (fds)", "daemon threads before / idle", "daemon fds before / idle",
         "scrape", "SMTP delivery"],
        [[args.clients - result["connect_failed"], result["connections_held_by_daemon"],
          f"{result['daemon_threads_before']} / {result['daemon_threads_while_idle']}",
          f"{result['daemon_fds_before']} / {result['daemon_fds_while_idle']}",
          f"{'ok' if result['scrape_ok'] else 'FAILED'} {result['scrape_seconds']} s",
          f"{'ok' if result['mail_delivered'] else 'FAILED'} {result['mail_seconds']} s"]],
    ))
    raise SystemExit(0 if result["scrape_ok"] and result["mail_delivered"] else 1)


if __name__ == "__main__":
    main()

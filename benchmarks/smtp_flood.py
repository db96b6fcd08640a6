"""1,100 idle clients against the SMTP content filter: real mail still gets through.

    .venv/bin/python -m benchmarks.smtp_flood                    # 1,100 idle clients, defaults below
    .venv/bin/python -m benchmarks.smtp_flood --clients 300 --idle-timeout 5
    .venv/bin/python -m benchmarks.smtp_flood --clients 100 --noop-interval 20 --idle-timeout 300   # NOOP flood

The relay runs as its own process, as `mailtriage serve` would (the SMTP filter with the keyword
fake model, JSON logs), under the 1,024 open-file limit the finding was made with; a real aiosmtpd
next hop counts the connections it is held. The benchmark opens the idle clients (every fifth
stops after RCPT, mid-transaction), then sends real mail like an MTA (a retry every 0.5 s) and
reports: clients served / refused with 421, the relay's open files, next-hop connections held
while the clients idle, when the real mail got through, and what the relay logged. With
``--noop-interval`` the held clients send NOOP at that pace all along (a NOOP flood): they must
not keep real mail out; the row then also counts the holders the relay closed to make room.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from benchmarks.common import ENV, REPO, loadavg, md_table, run_keyword_relay, write_json
from mailtriage.testing.imapserver import free_port


def _relay_child(port: int, hop_port: int, max_connections: int, idle_timeout: float) -> None:
    run_keyword_relay(port, hop_port, max_connections=max_connections, idle_timeout=idle_timeout)


class _Hop:
    def __init__(self) -> None:
        self.received = 0
        self.open = 0
        self.peak_during_idle = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1
        return "250 2.0.0 Ok: queued"


def _start_hop(port: int) -> tuple[Any, _Hop]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    hop = _Hop()

    class Counting(SMTP):
        def connection_made(self, transport: Any) -> None:
            hop.open += 1
            super().connection_made(transport)

        def connection_lost(self, error: Any) -> None:
            hop.open -= 1
            super().connection_lost(error)

    class HopController(Controller):
        def factory(self) -> SMTP:
            return Counting(self.handler, **self.SMTP_kwargs)

    controller = HopController(hop, hostname="127.0.0.1", port=port, server_hostname="nexthop.bench")
    controller.start()
    return controller, hop


def _mail(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "customer@example.com", "support@example.com", f"invoice {n}"
    msg["Message-ID"] = f"<flood-{n}-{time.time_ns()}@example.com>"
    msg.set_content("Where is my invoice?")
    return msg.as_bytes()


def _mta_send(port: int, raw: bytes, pause: float, give_up: float) -> tuple[bool, int, float]:
    started, attempts = time.monotonic(), 0
    while time.monotonic() - started < give_up:
        attempts += 1
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.bench", timeout=30) as client:
                client.sendmail("customer@example.com", ["support@example.com"], raw)
            return True, attempts, time.monotonic() - started
        except (smtplib.SMTPException, OSError):
            time.sleep(pause)
    return False, attempts, time.monotonic() - started


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1100)
    ap.add_argument("--max-connections", type=int, default=100, help="[smtp] max_connections (default 100)")
    ap.add_argument("--idle-timeout", type=float, default=10.0, help="[smtp] idle_timeout for the run (default 300 in config)")
    ap.add_argument("--nofile", type=int, default=1024, help="the relay's open-file limit (default 1024)")
    ap.add_argument("--noop-interval", type=float, default=0.0, help="held clients send NOOP every N s (0: silent)")
    ap.add_argument("--relay-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay_child:
        port, hop_port, max_conn, idle = args.relay_child
        _relay_child(int(port), int(hop_port), int(max_conn), float(idle))
        return

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.clients * 2 + 512)), hard))
    hop_port, port = free_port(), free_port()
    controller, hop = _start_hop(hop_port)
    log_path = Path(tempfile.mkstemp(prefix="smtp-flood-", suffix=".log")[1])

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, max(args.nofile, hard)))

    with log_path.open("wb") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.smtp_flood", "--relay-child", str(port), str(hop_port),
             str(args.max_connections), str(args.idle_timeout)],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=log_file, preexec_fn=limit_files,
        )
    result: dict[str, Any] = {"clients": args.clients, "max_connections": args.max_connections,
                              "idle_timeout": args.idle_timeout, "relay_nofile": args.nofile,
                              "load_before": loadavg()}
    idle: list[socket.socket] = []
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"READY":
            raise SystemExit(f"the relay did not start; its log: {log_path}")
        fds_before = _fds(child.pid)
        served = refused = other = mid_transaction = 0
        flood_started = time.monotonic()
        for i in range(args.clients):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            reader = sock.makefile("rb")
            banner = reader.readline()
            if banner.startswith(b"220"):
                served += 1
                if served % 5 == 0:
                    for line in (b"EHLO idle.bench", b"MAIL FROM:<idle@example.com>", b"RCPT TO:<support@example.com>"):
                        sock.sendall(line + b"\r\n")
                        while reader.readline()[3:4] == b"-":
                            pass
                    mid_transaction += 1
                idle.append(sock)
            elif banner.startswith(b"421"):
                refused += 1
                sock.close()
            else:
                other += 1
                sock.close()
        flood_seconds = time.monotonic() - flood_started
        noop_stop = threading.Event()
        noop_stats = {"noops": 0, "closed_by_relay": 0}

        def keep_talking() -> None:
            # A NOOP from every held client, every interval: aiosmtpd restarted its idle timer on it.
            alive = list(idle)
            while alive and not noop_stop.wait(args.noop_interval):
                for sock in list(alive):
                    try:
                        sock.sendall(b"NOOP\r\n")
                        reply = sock.recv(4096)
                        noop_stats["noops"] += 1
                    except OSError:
                        reply = b""
                    if not reply.startswith(b"250"):
                        noop_stats["closed_by_relay"] += 1
                        alive.remove(sock)

        talker = threading.Thread(target=keep_talking, daemon=True)
        if args.noop_interval > 0:
            talker.start()
        time.sleep(0.5)
        held_fds = _fds(child.pid)
        hop_held = hop.open
        ok, attempts, waited = _mta_send(port, _mail(0), pause=0.5, give_up=args.idle_timeout * 4 + 30)
        later = [_mta_send(port, _mail(n), pause=0.5, give_up=60)[0] for n in range(1, 11)]
        noop_stop.set()
        result.update(
            served=served, refused_421=refused, other_banner=other, mid_transaction=mid_transaction,
            flood_seconds=round(flood_seconds, 2), relay_fds_before=fds_before, relay_fds_while_idle=held_fds,
            next_hop_connections_while_idle=hop_held, real_mail_delivered=ok, real_mail_attempts=attempts,
            real_mail_seconds_after_flood=round(waited, 1), next_ten_delivered=sum(later),
            next_hop_received=hop.received, noop_interval=args.noop_interval, **noop_stats,
        )
    finally:
        for sock in idle:
            sock.close()
        child.terminate()
        child.wait(10)
        controller.stop()
    lines = log_path.read_text(errors="replace").splitlines()
    events: dict[str, int] = {}
    tracebacks = 0
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            events["(not json)"] = events.get("(not json)", 0) + 1
            tracebacks += "Traceback" in line
            continue
        events[entry.get("event", "?")] = events.get(entry.get("event", "?"), 0) + 1
        tracebacks += bool(entry.get("exception") or entry.get("exc_info"))
    result.update(relay_log_lines=len(lines), relay_log_tracebacks=tracebacks, relay_log_events=events,
                  load_after=loadavg())
    log_path.unlink()
    write_json("smtp_flood", result)
    print(json.dumps(result, indent=2))
    print(md_table(
        ["clients", "NOOP every", "served", "421", "next-hop conns while idle", "relay fds idle",
         "real mail through after", "next 10 delivered", "holders closed by relay", "log lines", "tracebacks"],
        [[args.clients, f"{args.noop_interval:g} s" if args.noop_interval else "-", result["served"], result["refused_421"],
          result["next_hop_connections_while_idle"], result["relay_fds_while_idle"],
          f"{result['real_mail_seconds_after_flood']} s ({result['real_mail_attempts']} tries)", result["next_ten_delivered"],
          result["closed_by_relay"] if args.noop_interval else "-", result["relay_log_lines"], result["relay_log_tracebacks"]]],
    ))
    good = result["real_mail_delivered"] and result["next_ten_delivered"] == 10 and tracebacks == 0
    raise SystemExit(0 if good else 1)


if __name__ == "__main__":
    main()

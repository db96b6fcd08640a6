"""Bytes in flight vs the relay's memory: concurrent large messages through the SMTP content filter.

    .venv/bin/python -m benchmarks.smtp_memory                       # 1 and 4 concurrent 49 MB messages
    .venv/bin/python -m benchmarks.smtp_memory --size-mb 20 --concurrency 1 2 4 8 --budget-mb 100

The relay runs as its own process (the SMTP filter with the keyword fake model), so its resident
memory is its own; a real aiosmtpd next hop in this process takes the messages. For each
concurrency, that many senders send one message each at the same time; the row gives the bytes in
flight (sum of the message sizes), the relay's resident memory before and at its peak (VmHWM,
reset between rows), the peak growth per byte in flight, and the replies the senders got (452
when ``--budget-mb``, ``[smtp] max_bytes_in_flight``, is spent).
"""

from __future__ import annotations

import argparse
import json
import smtplib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from benchmarks.common import ENV, REPO, loadavg, md_table, run_keyword_relay, write_json
from mailtriage.testing.imapserver import free_port

MIB = 1024 * 1024


def _relay_child(port: int, hop_port: int, size_limit: int, budget: int) -> None:
    run_keyword_relay(port, hop_port, log=False, data_size_limit=size_limit, max_bytes_in_flight=budget or None)


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _message(size: int, n: int) -> bytes:
    head = (f"From: customer@example.com\r\nTo: support@example.com\r\nSubject: invoice {n}\r\n"
            f"Message-ID: <mem-{n}@example.com>\r\nContent-Type: text/plain\r\n\r\nWhere is my invoice?\r\n").encode()
    line = b"x" * 76 + b"\r\n"  # a base64-like body: many short lines, the worst case for per-line copies
    return head + line * ((size - len(head)) // len(line))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=49.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--budget-mb", type=float, default=0, help="[smtp] max_bytes_in_flight (0: the default)")
    ap.add_argument("--relay-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay_child:
        _relay_child(*(int(x) for x in args.relay_child))
        return

    from aiosmtpd.controller import Controller

    class Hop:
        received = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            Hop.received += 1
            envelope.content = envelope.original_content = None  # keep nothing
            return "250 2.0.0 Ok: queued"

    size = int(args.size_mb * MIB)
    hop_port, port = free_port(), free_port()
    controller = Controller(Hop(), hostname="127.0.0.1", port=hop_port, data_size_limit=size + MIB)
    controller.start()
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.smtp_memory", "--relay-child", str(port), str(hop_port),
         str(size + MIB), str(int(args.budget_mb * MIB))],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    rows, results = [], []
    try:
        assert child.stdout is not None
        for line in child.stdout:  # its log lines come first
            if line.strip() == b"READY":
                break
        else:
            raise SystemExit("the relay did not start")
        for conc in args.concurrency:
            messages = [_message(size, n) for n in range(conc)]
            replies: list[str] = []
            _reset_hwm(child.pid)
            before = _status(child.pid)["VmRSS"]
            start = threading.Barrier(conc)

            def send(raw: bytes) -> None:
                start.wait()
                try:
                    with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.bench", timeout=600) as client:
                        client.sendmail("customer@example.com", ["support@example.com"], raw)
                    replies.append("250")
                except smtplib.SMTPResponseException as exc:
                    replies.append(str(exc.smtp_code))
                except (smtplib.SMTPException, OSError) as exc:
                    replies.append(type(exc).__name__)

            threads = [threading.Thread(target=send, args=(m,)) for m in messages]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            peak = _status(child.pid)["VmHWM"]
            in_flight = sum(len(m) for m in messages)
            accepted = sum(len(m) for m, r in zip(messages, replies) if r == "250")
            row = {"concurrency": conc, "message_mib": round(size / MIB, 1), "bytes_in_flight_mib": round(in_flight / MIB),
                   "rss_before_mib": round(before / MIB), "peak_rss_mib": round(peak / MIB),
                   "growth_per_byte_in_flight": round((peak - before) / in_flight, 2),
                   "replies": sorted(replies), "accepted_mib": round(accepted / MIB)}
            results.append(row)
            rows.append([conc, row["message_mib"], row["bytes_in_flight_mib"], row["rss_before_mib"], row["peak_rss_mib"],
                         row["growth_per_byte_in_flight"], " ".join(row["replies"])])
            del messages
    finally:
        child.terminate()
        child.wait(10)
        controller.stop()
    result = {"size_mb": args.size_mb, "budget_mb": args.budget_mb, "rows": results, "load": loadavg()}
    write_json("smtp_memory", result)
    print(json.dumps(result, indent=2))
    print(md_table(["concurrent", "message MiB", "in flight MiB", "relay RSS before MiB", "relay peak RSS MiB",
                    "peak growth / byte in flight", "replies"], rows))


if __name__ == "__main__":
    main()

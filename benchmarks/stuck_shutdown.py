"""`mailtriage serve` against an inference server that hangs or trickles: how long until the sender
hears 451, and how long SIGTERM takes while calls are stuck.

    .venv/bin/python -m benchmarks.stuck_shutdown                  # hang and 1 byte/s, [model] timeout 5 and 600
    .venv/bin/python -m benchmarks.stuck_shutdown --runs 5 --clients 5

The daemon runs as its own process exactly as `mailtriage serve` (SMTP content filter on, `[model]
backend = "http"`), with a real aiosmtpd next hop. A local TEI-shaped server answers the start-up
probe, then either never answers (hang) or trickles its answer one byte a second (trickle: each
socket read is quick, so only a deadline for the whole call ends it). Per scenario: seconds from
sending one message to the filter's reply (451 expected: the sender keeps the message), then
`clients` messages in flight, SIGTERM one second into the stuck call, and the seconds until the
process exited (systemd's TimeoutStopSec is 60). Reports the longest shutdown over the runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchmarks.common import ENV, REPO, loadavg, md_table, write_json
from mailtriage.testing.waits import port_open
from mailtriage.testing.imapserver import free_port

LABELS = ("billing", "login", "refunds")


class StuckInference:
    """TEI /predict: a real answer while ``mode`` is "ok", else hang or trickle one byte a second."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests = 0
        self.closing = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests += 1
                try:
                    if stub.mode == "hang":
                        stub.closing.wait()
                        return
                    answer = json.dumps([[{"label": lab, "score": 0.8 if i == 0 else 0.1} for i, lab in enumerate(LABELS)]
                                         for _ in body["inputs"]]).encode()
                    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}"
                            "\r\n\r\n").encode()
                    if stub.mode == "ok":
                        self.wfile.write(head + answer)
                        return
                    for i in range(len(head + answer)):  # trickle
                        if stub.closing.wait(1.0):
                            return
                        self.wfile.write((head + answer)[i : i + 1])
                except OSError:
                    pass  # the daemon gave up: what the deadline is for

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def _mail(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "customer@example.com", "support@example.com", f"login {n}"
    msg["Message-ID"] = f"<stuck-{n}-{time.time_ns()}@bench>"
    msg.set_content("my login fails, please help")
    return msg.as_bytes()


def _send(port: int, n: int) -> tuple[str, float]:
    started = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=700) as client:
            client.sendmail("customer@example.com", ["support@example.com"], _mail(n))
        outcome = "250"
    except smtplib.SMTPResponseException as exc:
        outcome = str(exc.smtp_code)
    except (smtplib.SMTPServerDisconnected, OSError):
        outcome = "dropped"
    return outcome, time.monotonic() - started


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _hop(port: int) -> Any:
    from aiosmtpd.controller import Controller

    class Hop:
        received = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            Hop.received += 1
            return "250 OK"

    controller = Controller(Hop(), hostname="127.0.0.1", port=port)
    controller.start()
    return controller, Hop


def scenario(mode: str, timeout: float, clients: int, workdir: Path) -> dict[str, Any]:
    stub = StuckInference()
    hop_port, listen = free_port(), free_port()
    controller, hop = _hop(hop_port)
    config = workdir / f"config-{mode}-{timeout:g}.toml"
    config.write_text(f"""
state_path = "{workdir / f'state-{mode}-{timeout:g}.sqlite3'}"
metrics_port = 0
[categories]
billing = "Support/Billing"
login = "Support/Login"
refunds = "Support/Refunds"
[model]
path = "{workdir / 'none'}"
backend = "http"
url = "{stub.url}"
timeout = {timeout}
[smtp]
enabled = true
listen_host = "127.0.0.1"
listen_port = {listen}
next_hop_host = "127.0.0.1"
next_hop_port = {hop_port}
[training]
schedule = ""
""")
    log_path = workdir / f"serve-{mode}-{timeout:g}.log"
    row: dict[str, Any] = {"mode": mode, "timeout_s": timeout, "clients": clients}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mailtriage.cli.main", "--config", str(config), "serve"],
                                cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: port_open(listen), 120, "the SMTP filter")
        stub.mode = mode
        if timeout <= 60:  # one message alone: how long the sender waits for its 451
            outcome, seconds = _send(listen, 0)
            row.update(first_reply=outcome, first_reply_s=round(seconds, 1))
        seen = stub.requests
        results: list[tuple[str, float]] = []
        senders = [threading.Thread(target=lambda n=n: results.append(_send(listen, n)), daemon=True)
                   for n in range(1, clients + 1)]
        for t in senders:
            t.start()
        _wait(lambda: stub.requests > seen, 60, "a classify call in flight")
        time.sleep(1.0)  # one second into the stuck call
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=700)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed"
        row.update(shutdown_s=round(time.monotonic() - started, 2), rc=rc)
        for t in senders:
            t.join(30)
        row["senders"] = ",".join(sorted(o for o, _ in results))
        row["next_hop_received"] = hop.received
        log_text = log_path.read_text(errors="replace")
        row["abandoned_logged"] = "inference_worker_abandoned" in log_text
    finally:
        if proc.poll() is None:
            proc.kill()
        stub.close()
        controller.stop()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3, help="messages in flight at SIGTERM")
    ap.add_argument("--timeouts", default="5,600", help="[model] timeout values to try (comma-separated)")
    args = ap.parse_args()
    result: dict[str, Any] = {"load_before": loadavg(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="stuck-shutdown-") as tmp:
        for timeout in (float(t) for t in args.timeouts.split(",")):
            for mode in ("hang", "trickle"):
                for run in range(args.runs):
                    row = scenario(mode, timeout, args.clients, Path(tmp))
                    row["run"] = run + 1
                    print(json.dumps(row), flush=True)
                    result["rows"].append(row)
    worst: dict[tuple[str, float], dict[str, Any]] = {}
    for row in result["rows"]:
        key = (row["mode"], row["timeout_s"])
        if key not in worst or row["shutdown_s"] > worst[key]["shutdown_s"]:
            worst[key] = row
    table = [[mode, f"{timeout:g}", row.get("first_reply", "-"), row.get("first_reply_s", "-"),
              str(row["shutdown_s"]), str(row["rc"]), row["senders"], str(row["next_hop_received"])]
             for (mode, timeout), row in sorted(worst.items())]
    print(md_table(["server", "[model] timeout s", "reply to a lone message", "after s", "longest shutdown s",
                    "exit status", f"{args.clients} senders in flight got", "relayed"], table))
    result["load_after"] = loadavg()
    write_json("stuck_shutdown", result)


if __name__ == "__main__":
    main()

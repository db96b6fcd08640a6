"""What mailtriage costs behind a real Postfix: msg/s and latency without it, as a content filter
and as a milter, on the same mail.

    .venv/bin/python -m benchmarks.postfix_filter                  # 400 mails, 8 clients, 60 one by one
    .venv/bin/python -m benchmarks.postfix_filter --messages 1000 --clients 16

Needs root (Postfix's master) and Postfix installed (`make deps`). The same mail goes through the
same throwaway Postfix (mailtriage.testing.postfix) three times: relayed straight to the SMTP sink;
through the content-filter recipe (docs/postfix/main.cf, master.cf) and mailtriage's SMTP content
filter; through the milter recipe (docs/postfix/main-milter.cf) and mailtriage's milter. mailtriage
runs as its own process as `mailtriage serve` would, with the keyword fake model: what is measured
is the mail path (Postfix queue -> filter -> reinjection -> queue, or smtpd -> milter -> queue),
not the model (see RESULTS.md for model speed). Latency: one mail at a time, client's first byte
to the sink's 250; "added" is the difference to the row without mailtriage. Throughput: many
clients at once, first mail sent to last mail delivered ("delivered") and to the last client's
250 ("accepted").
"""

from __future__ import annotations

import argparse
import email.utils
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ENV, REPO, loadavg, md_table, run_keyword_relay, write_json

# The three paths: (Postfix recipe, mailtriage child flag, row name).
PATHS = {
    "plain": (False, None, "Postfix -> sink"),
    "content_filter": ("content_filter", "--relay-child", "Postfix -> mailtriage (content filter) -> Postfix -> sink"),
    "milter": ("milter", "--milter-child", "Postfix (+ mailtriage milter) -> sink"),
}
CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}

BODY = (
    "Hello,\n\nI was charged twice for my March invoice (order 48213). Could you check the billing\n"
    "history of my account and refund the second charge? The card ends in 4242.\n\n"
    + "Thanks for your help, this is the third time I write about it.\n" * 20
    + "\nBest regards,\nA customer\n"
)


def _mail(n: int) -> tuple[bytes, bytes]:
    message_id = email.utils.make_msgid(idstring=f"bench{n}", domain="example.org").encode()
    head = (
        b"From: Customer <customer@example.org>\r\nTo: support@example.com\r\nSubject: invoice charged twice\r\n"
        b"Date: " + email.utils.formatdate().encode() + b"\r\nMessage-ID: " + message_id + b"\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    return message_id, head + BODY.encode().replace(b"\n", b"\r\n")


def _relay_child(port: int, hop_port: int) -> None:
    run_keyword_relay(port, hop_port)


def _milter_child(port: int) -> None:
    import asyncio

    from mailtriage.cli.logs import configure_logging
    from mailtriage.config import Config, MilterConfig, ModelConfig
    from mailtriage.milter.server import MilterServer
    from mailtriage.testing.fakes import KeywordClassifier

    configure_logging("info", json=True)
    config = Config(categories=CATEGORIES, model=ModelConfig(threshold=0.6, device="cpu"),
                    milter=MilterConfig(enabled=True, listen_host="127.0.0.1", listen_port=port))
    classifier = KeywordClassifier(tuple(CATEGORIES))

    async def classify(texts: Any) -> Any:
        return classifier(texts)

    async def main() -> None:
        server = MilterServer(config, classify)
        await server.start()
        print("READY", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _message_id(content: bytes) -> bytes:
    for line in content.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip()
    return b""


def _run(path: str, messages: int, clients: int, sequential: int) -> dict[str, Any]:
    from mailtriage.testing.postfix import Postfix, SmtpSink

    recipe, child_flag, _ = PATHS[path]
    sink = SmtpSink().start()
    postfix = Postfix(sink.port, recipe=recipe)
    child: subprocess.Popen[bytes] | None = None
    log_path = Path(tempfile.mkstemp(prefix="postfix-filter-", suffix=".log")[1])
    try:
        if child_flag is not None:
            ports = ([str(postfix.filter_port), str(postfix.reinject_port)] if path == "content_filter"
                     else [str(postfix.milter_port)])
            with log_path.open("wb") as log_file:
                child = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.postfix_filter", child_flag, *ports],
                    cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=log_file,
                )
            assert child.stdout is not None
            if child.stdout.readline().strip() != b"READY":
                raise SystemExit(f"mailtriage ({path}) did not start; its log: {log_path}")
        postfix.start()

        def arrivals() -> dict[bytes, float]:
            return {_message_id(d.content): d.received_at for d in sink.received}

        # Warm-up: Postfix starts each service on first use.
        with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, timeout=60) as client:
            for n in range(5):
                client.sendmail("customer@example.org", ["support@example.com"], _mail(-1 - n)[1])
        sink.wait_for(lambda got: len(got) >= 5, timeout=60, what="the warm-up mail")

        latencies: list[float] = []
        with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, timeout=60) as client:
            for n in range(sequential):
                message_id, raw = _mail(n)
                before = len(sink.received)
                started = time.monotonic()
                client.sendmail("customer@example.org", ["support@example.com"], raw)
                sink.wait_for(lambda got, b=before: len(got) > b, timeout=60, what=f"mail {n}")
                latencies.append(arrivals()[message_id] - started)

        before = len(sink.received)
        batch = [_mail(100_000 + n)[1] for n in range(messages)]
        shares = [batch[i::clients] for i in range(clients)]

        def send(share: list[bytes]) -> None:
            with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, timeout=60) as client:
                for raw in share:
                    client.sendmail("customer@example.org", ["support@example.com"], raw)

        threads = [threading.Thread(target=send, args=(share,)) for share in shares]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent = time.monotonic()
        got = sink.wait_for(lambda g: len(g) >= before + messages, timeout=600, what=f"{messages} mails")
        finished = max(d.received_at for d in got[before:])
        tagged = sum(b"X-Mailtriage-Category:" in d.content for d in got[before:])
        return {
            "path": path,
            "messages": messages,
            "clients": clients,
            "msg_per_s": round(messages / (finished - started), 1),
            "accept_msg_per_s": round(messages / (sent - started), 1),
            "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "latency_p95_ms": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))] * 1000, 1),
            "tagged": tagged,
        }
    finally:
        if child is not None:
            child.terminate()
            child.wait(10)
        postfix.stop()
        sink.stop()
        log_path.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=400, help="mails in the throughput run (default 400)")
    ap.add_argument("--clients", type=int, default=8, help="SMTP clients sending at once (default 8)")
    ap.add_argument("--sequential", type=int, default=60, help="mails sent one at a time for latency (default 60)")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated paths to measure, of {', '.join(PATHS)} (default all; the added "
                         "latency needs plain)")
    ap.add_argument("--relay-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--milter-child", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay_child:
        _relay_child(int(args.relay_child[0]), int(args.relay_child[1]))
        return
    if args.milter_child:
        _milter_child(int(args.milter_child[0]))
        return
    paths = [name.strip() for name in args.paths.split(",") if name.strip()]
    unknown = [name for name in paths if name not in PATHS]
    if unknown:
        ap.error(f"unknown path(s) {unknown}; expected some of {', '.join(PATHS)}")
    load_before = loadavg()
    rows = [_run(path, args.messages, args.clients, args.sequential) for path in paths]
    plain = next((r for r in rows if r["path"] == "plain"), None)
    for row in rows:
        if plain is not None and row is not plain:
            row["added_latency_p50_ms"] = round(row["latency_p50_ms"] - plain["latency_p50_ms"], 1)
            row["added_latency_p95_ms"] = round(row["latency_p95_ms"] - plain["latency_p95_ms"], 1)
    result = {"rows": rows, "load_before": load_before, "load_after": loadavg()}
    write_json("postfix_filter", result)
    print(md_table(
        ["path", "mails", "clients", "msg/s (delivered)", "msg/s (accepted)", "latency p50 ms", "latency p95 ms",
         "added p50 ms", "added p95 ms", "tagged"],
        [[PATHS[r["path"]][2], r["messages"], r["clients"], r["msg_per_s"], r["accept_msg_per_s"],
          r["latency_p50_ms"], r["latency_p95_ms"], r.get("added_latency_p50_ms", "-"),
          r.get("added_latency_p95_ms", "-"), r["tagged"]]
         for r in rows],
    ))
    print(f"load average before/after: {load_before} / {result['load_after']}")


if __name__ == "__main__":
    main()

"""Peak memory of fetching one huge message, with and without the literal cap.

A partial fetch (``BODY.PEEK[]<0.N>``) is a request the server may ignore; this benchmark plays
that server by fetching the whole message (``BODY.PEEK[]``), which makes a real Dovecot send one
literal of the full size. Each measurement is a fresh child process (its VmHWM is a high-water
mark), connected with ``mailtriage.imap.connection.connect`` exactly as the daemon connects.

    .venv/bin/python -m benchmarks.imap_memory            # 200 MB message, cap 64 MiB vs no cap
    .venv/bin/python -m benchmarks.imap_memory --mb 50    # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ENV, md_table, write_json

NO_CAP = 1 << 40  # larger than any literal: what the client did before cap_literals


def _hwm_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (big) parent.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _child(port: int, cap: int, password_file: str) -> None:
    from mailtriage.config import AccountConfig
    from mailtriage.imap import connection

    base = _hwm_mib()
    account = AccountConfig(name="bench", host="127.0.0.1", port=port, tls="none", username="support",
                            password_file=password_file, max_message_bytes=cap)
    client = connection.connect(account, timeout=300)
    client.select_folder("Huge", readonly=True)
    uid = client.search(["ALL"])[0]
    data = client.fetch([uid], [b"BODY.PEEK[]", b"RFC822.SIZE"])[uid]
    kept = len(data[b"BODY[]"])
    client.noop()  # the connection is still in step
    connection.close(client)
    peak = _hwm_mib()
    print(json.dumps({"size": data[b"RFC822.SIZE"], "kept": kept, "peak_rss_mib": peak,
                      "before_fetch_mib": base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="message size in MB (default 200)")
    ap.add_argument("--cap-mib", type=int, default=64, help="max_message_bytes in MiB (default 64, the default)")
    ap.add_argument("--child", nargs=3, metavar=("PORT", "CAP", "PWFILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(int(args.child[0]), int(args.child[1]), args.child[2])
        return

    from mailtriage.testing.dovecot import Dovecot, load_messages

    line = b"x" * 998 + b"\r\n"
    body = line * (args.mb * 1_000_000 // len(line))
    raw = b"Subject: huge\r\nMessage-ID: <huge@bench>\r\n\r\n" + body
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp, Dovecot() as server:
        pw = Path(tmp) / "pw"
        pw.write_text("secret")
        pw.chmod(0o600)
        load_messages(server, "Huge", [raw])
        del raw, body
        for label, cap in ((f"capped at {args.cap_mib} MiB", args.cap_mib << 20), ("no cap (before the fix)", NO_CAP)):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.imap_memory", "--child", str(server.port), str(cap), str(pw)],
                env=ENV, capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["variant"] = label
            results.append(r)
            rows.append([label, f"{r['size'] / 1e6:.0f} MB", f"{r['kept'] / 2**20:.0f} MiB",
                         f"{r['before_fetch_mib']:.0f} MiB", f"{r['peak_rss_mib']:.0f} MiB"])
    write_json("imap_memory", {"mb": args.mb, "results": results})
    print(md_table(["client", "literal sent", "kept", "RSS before fetch", "peak RSS"], rows))


if __name__ == "__main__":
    main()

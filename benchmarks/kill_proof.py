"""The SIGKILL proof, long version: >= 20 real SIGKILLs of the worker process
while it files a 1,000-message backlog in a real Dovecot, restarted each time, plus Dovecot
restarts mid-run; then every message is looked up on the server and in the state DB.

    .venv/bin/python -m benchmarks.kill_proof                      # 1,000 messages, 21 kills, 2 restarts, move
    .venv/bin/python -m benchmarks.kill_proof --action header --seed 2
    .venv/bin/python -m benchmarks.kill_proof --messages 200 --kills 6

Kills cycle through three points (``mailtriage.testing.killproof.KILL_POINTS``): right after an
action and before its status is written, right after the 'pending' row and before the action, and
a random time. Passes when lost, duplicated, left in INBOX, decisions != 1 and pending rows are all 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import loadavg, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=21)
    ap.add_argument("--dovecot-restarts", type=int, default=2)
    ap.add_argument("--action", choices=["move", "header"], default="move")
    ap.add_argument("--fetch-batch", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from mailtriage.testing.dovecot import Dovecot
    from mailtriage.testing.killproof import run_proof

    load_before = loadavg()
    with Dovecot() as server, tempfile.TemporaryDirectory(prefix="kill-proof-") as tmp:
        server.add_user("proof", "proof-secret")
        result = run_proof(
            server, "proof", "proof-secret", Path(tmp), messages=args.messages, kills=args.kills,
            action=args.action, fetch_batch=args.fetch_batch, seed=args.seed,
            dovecot_restarts=args.dovecot_restarts, log=print,
        )
    report = {**result.as_dict(), "action": args.action, "seed": args.seed, "fetch_batch": args.fetch_batch,
              "load_before": load_before, "load_after": loadavg()}
    write_json(f"kill_proof_{args.action}", report)
    print(json.dumps(report, indent=2, default=str))
    raise SystemExit(0 if result.ok else 1)


if __name__ == "__main__":
    main()

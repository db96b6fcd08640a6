"""Fuzz the SMTP front and the header tagging with seeded inputs: >= 100,000 each.

    .venv/bin/python -m benchmarks.fuzz_smtp                       # 100,000 SMTP inputs + 100,000 tagging inputs
    .venv/bin/python -m benchmarks.fuzz_smtp --smtp 5000 --tagging 5000 --seed 7

SMTP: a real relay (aiosmtpd front, the content filter, the keyword fake model) on 127.0.0.1 with a
real aiosmtpd next hop; inputs are command lines (random verbs, addresses with NUL, non-UTF-8 and
UTF-8 bytes, long lines, random bytes) and whole hostile messages with forged X-Mailtriage-* fields
and smuggling line endings. Found when: a reply is not a well-formed SMTP reply, the connection
drops without one, a handler error is logged, or a message the front accepted is missing, doubled,
not CRLF-only or carries another X-Mailtriage-* field at the next hop. Tagging: ``add_headers`` on
the same messages (CRLF only, our two fields the only ones, fingerprint unchanged). See
``mailtriage.testing.smtp_fuzz``; ``forged_mail(seed, index)`` replays a message input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time

from benchmarks.common import loadavg, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smtp", type=int, default=100_000, help="SMTP inputs (default 100000)")
    ap.add_argument("--tagging", type=int, default=100_000, help="tagging inputs (default 100000)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from mailtriage.testing.smtp_fuzz import check_relayed, fuzz_smtp, fuzz_tagging, relay_with_next_hop

    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd logs every bogus command
    result: dict[str, object] = {"seed": args.seed, "load_before": loadavg()}
    started = time.monotonic()
    with contextlib.contextmanager(relay_with_next_hop)() as relay:
        smtp = fuzz_smtp(relay.port, args.smtp, seed=args.seed)
        deadline = time.monotonic() + 30
        while len(relay.received) < smtp.counts.get("delivered", 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        received, errors = list(relay.received), list(relay.errors)
    relayed_problems = check_relayed(received)
    result["smtp"] = {
        "inputs": smtp.inputs, "seconds": round(time.monotonic() - started, 1), "failures": smtp.failures,
        "replies": dict(sorted(smtp.counts.items())), "accepted_messages": smtp.counts.get("delivered", 0),
        "at_next_hop": len(received), "handler_errors": len(errors), "relayed_problems": relayed_problems[:20],
    }
    started = time.monotonic()
    tagging = fuzz_tagging(args.tagging, seed=args.seed)
    result["tagging"] = {"inputs": tagging.inputs, "seconds": round(time.monotonic() - started, 1),
                         "failures": tagging.failures, "slowest_s": round(tagging.slowest_s, 4)}
    result["load_after"] = loadavg()
    write_json("fuzz_smtp", result)
    print(json.dumps(result, indent=2, default=str))
    bad = (smtp.failures or errors or relayed_problems or tagging.failures
           or len(received) != smtp.counts.get("delivered", 0))
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()

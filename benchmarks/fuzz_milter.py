"""Fuzz the milter with seeded hostile inputs: the long run of tests/test_milter_fuzz.py.

    .venv/bin/python -m benchmarks.fuzz_milter                    # 100,000 inputs
    .venv/bin/python -m benchmarks.fuzz_milter --inputs 5000 --seed 7

A real MilterServer (keyword fake model, max_message_size 256 KiB) on 127.0.0.1; two inputs in three
are raw hostile packet streams (garbage, zero/oversized lengths, unknown codes, bad offers, malformed
payloads, header floods, bodies past the limit, cut streams), one in three a forged hostile message
sent the way Postfix sends it. Found when: a reply is not a well-formed filter reply, a connection
neither answers nor closes, a handler error occurs, a tagged message keeps another X-Mailtriage-*
field, or more than the limit was held. See ``mailtriage.testing.milter_fuzz``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

from benchmarks.common import loadavg, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs (default 100000)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from mailtriage.testing.milter_fuzz import MAX_MESSAGE, fuzz_milter, milter_under_test, wait_idle

    result: dict[str, object] = {"seed": args.seed, "load_before": loadavg()}
    started = time.monotonic()
    with contextlib.contextmanager(milter_under_test)() as milter:
        report = fuzz_milter(milter.port, args.inputs, seed=args.seed)
        wait_idle(milter.server)
        errors, peak = milter.server.errors, milter.server.peak_held
    result.update({
        "inputs": report.inputs, "seconds": round(time.monotonic() - started, 1), "failures": report.failures,
        "outcomes": dict(sorted(report.counts.items())), "handler_errors": errors,
        "peak_held_bytes": peak, "limit_bytes": MAX_MESSAGE, "load_after": loadavg(),
    })
    write_json("fuzz_milter", result)
    print(json.dumps(result, indent=2, default=str))
    raise SystemExit(1 if report.failures or errors or peak > MAX_MESSAGE else 0)


if __name__ == "__main__":
    main()

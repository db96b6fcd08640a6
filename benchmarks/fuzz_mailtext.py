"""Fuzz the mail-text functions with seeded hostile mail: >= 100,000 inputs.

    .venv/bin/python -m benchmarks.fuzz_mailtext                 # 100,000 inputs, seed 1
    .venv/bin/python -m benchmarks.fuzz_mailtext --n 5000 --seed 7

Every input goes through mail_text, message_key, content_fingerprint, message_date and
message_headers (the functions the watcher, the relay and the trainer share); see ``mailtriage.testing.fuzz`` for the generator and
what counts as a failure. A failure prints its index: ``hostile_message(seed, index)`` replays it.
"""

from __future__ import annotations

import argparse
import json
import time

from tqdm.auto import tqdm

from benchmarks.common import loadavg, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="inputs (default 100000)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from mailtriage.testing.fuzz import run_mailtext_fuzz

    load_before = loadavg()
    started = time.monotonic()
    with tqdm(total=args.n, unit="input", desc="fuzzing mail_text") as bar:
        report = run_mailtext_fuzz(args.seed, args.n, on_input=lambda i: bar.update(1))
    report["seconds"] = time.monotonic() - started
    report["load_before"], report["load_after"] = load_before, loadavg()
    write_json("fuzz_mailtext", report)
    failures = report["failures"]
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=2, default=str))
    print(f"{args.n} inputs, {report['bytes'] / 1e6:.0f} MB, failures: {len(failures)}")  # type: ignore[arg-type]
    for f in failures[:20]:  # type: ignore[index]
        print("  ", f)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()

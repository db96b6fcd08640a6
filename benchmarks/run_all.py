"""`make bench`: every benchmark in turn (accuracy, then speed, then the daemon on 20 Newsgroups mail).

    .venv/bin/python -m benchmarks.run_all [--quick]

Each step is its own process, so one's memory and threads never colour the next one's numbers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks.common import ENV, REPO

STEPS = ("accuracy", "speed", "daemon")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", action="append", choices=STEPS, help="repeatable; default: all")
    args = ap.parse_args(argv)
    failed = []
    for step in args.only or STEPS:
        argv_step = [sys.executable, "-m", f"benchmarks.{step}", *(["--quick"] if args.quick else [])]
        print(f"\n## {step}: {' '.join(argv_step[1:])}", flush=True)
        started = time.monotonic()
        rc = subprocess.call(argv_step, cwd=REPO, env=ENV)
        print(f"   ({step}: exit {rc}, {time.monotonic() - started:.0f} s)", flush=True)
        if rc != 0:
            failed.append(step)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

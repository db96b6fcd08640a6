"""How long the default recipe takes to fine-tune on 2,000 real-length mails, and what it scores.

Training time is what a user waits for after ``mailtriage-train``; it only counts at the same
accuracy, so the row carries both. The run is ``benchmarks.recipe``'s (the product's ``finetune``
with ``TrainParams``' own defaults, epochs and early stopping included, then ``load_classifier``
as served), on 20 Newsgroups mail: ``--train-per-class`` mails per newsgroup from the older 80% of
each group (2,000 by default; 10% of them become the validation slice), scored on a dev set of
``--dev-per-class`` other older mails per group. The test set (each group's newest 20%) is never read.

    .venv/bin/python -m benchmarks.train_speed --threads 2
    .venv/bin/python -m benchmarks.train_speed --threads 2 --epochs 2      # per-epoch time only

Prints one row: wall time, CPU time (all threads; steadier than wall time on a shared machine), mean epoch time, epochs run / best, peak RSS, dev accuracy of the
model alone and of the ensemble, and the load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from benchmarks.common import busy_processes, machine, md_table, rel, write_json
from benchmarks.recipe import run_try

HEADERS = ("mails", "threads", "wall", "CPU", "epoch (mean)", "epochs run / best", "peak RSS", "dev acc model",
           "dev acc ensemble", "load before -> after")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=100, help="mails per newsgroup to train on (default 100: 2,000)")
    ap.add_argument("--dev-per-class", type=int, default=15, help="dev mails per newsgroup (default 15: 300)")
    ap.add_argument("--epochs", type=int, help="cap the epochs (default: TrainParams' own)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the 2-core goal)")
    ap.add_argument("--tag", default="", help="suffix of the JSON's name, e.g. 'before'")
    args = ap.parse_args(argv)
    import torch

    from mailtriage.core.training import TrainParams

    torch.set_num_threads(args.threads)
    epochs = args.epochs or TrainParams().epochs
    started = time.monotonic()
    busy = busy_processes()
    r = run_try("20news", "control", args.train_per_class, args.dev_per_class, epochs)
    r["wall_s"] = round(time.monotonic() - started, 1)
    r["machine"] = {**machine(), "threads": args.threads, "busy_at_start": busy}
    r["command"] = (f".venv/bin/python -m benchmarks.train_speed --train-per-class {args.train_per_class} "
                    f"--dev-per-class {args.dev_per_class}" + (f" --epochs {args.epochs}" if args.epochs else "")
                    + f" --threads {args.threads}")
    path = write_json("train-speed" + (f"-{args.tag}" if args.tag else ""), r)
    epoch_s = [h["seconds"] for h in r["history"]]
    dev = r["dev"]
    row = (
        f"{r['n_train'] + r['n_val']} ({r['n_train']} train + {r['n_val']} val)",
        args.threads,
        f"{r['train_seconds']:.0f} s",
        f"{r['train_cpu_seconds']:.0f} s",
        f"{sum(epoch_s) / len(epoch_s):.0f} s",
        f"{len(epoch_s)} of {r['params']['epochs']} / {r['finetune']['best_epoch']}",
        f"{r['finetune']['peak_rss_mb']:.0f} MiB",
        f"{dev['model']['accuracy']:.1%} (n={dev['model']['n']})",
        f"{dev['ensemble']['accuracy']:.1%}",
        f"{r['loadavg_before_train'][0]:.1f} -> {r['loadavg_after_train'][0]:.1f}",
    )
    print(md_table(HEADERS, [row]))
    print(f"per epoch: {', '.join(f'{s:.0f} s' for s in epoch_s)}; command: {r['command']}; {rel(path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

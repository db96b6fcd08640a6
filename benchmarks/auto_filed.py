"""Which `training.auto_filed` setting should be the default? A simulated mailbox on a dev split.

The retrain harvests the category folders, where the daemon's own filings sit next to what staff
sorted. Counting a filing nobody moved as a label adds data, but also the daemon's mistakes that
nobody has noticed yet (and mail forged to be filed into one category). This simulation measures
the trade on BANKING77's train split (its test split is never read):

1. Per seed, 20% of train.csv is the dev set: staff-labelled truth, used only for scoring.
2. Of the rest, ``--staff-share`` is the staff-sorted history (with ``--staff-noise`` of it in a
   wrong folder, as real sorting has); the remainder is new mail arriving evenly over
   ``--days`` days before the retrain.
3. The daemon is the TF-IDF baseline trained on that history. It files each new message whose
   confidence is in the top ``--coverage`` share and sends the rest to the unsure folder, which staff
   sort (each with a delay: exponential, mean ``--sort-delay`` days; not yet sorted at retrain time
   means not in any category folder). ``--forged`` of the new mail is crafted to be filed into one
   category whatever it says (the daemon is fooled every time).
4. Staff notice a wrong filing with probability ``--notice`` and move it after an exponential delay
   (mean ``--notice-delay`` days): a correction, once that moment is before the retrain. Mail
   filed and not (yet) moved stays in its folder as a daemon filing of known age.
5. Each setting builds the training set the trainer would (staff + corrections + the daemon filings
   it keeps), fits the baseline and is scored on the dev set. ``after_days N`` keeps filings at
   least N days old.

    .venv/bin/python -m benchmarks.auto_filed --threads 1 [--seeds 13 14 15] [--staff-share 0.3] [--json OUT] [--quick]

The TF-IDF baseline stands in for the fine-tune because it is cheap (seconds per fit); the question
is about the labels, not the learner.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import DATASETS

DATA = DATASETS / "banking77" / "train.csv"
SETTINGS: tuple[tuple[str, int], ...] = (("exclude", 0), ("include", 0), ("after_days", 3), ("after_days", 7),
                                         ("after_days", 14))


def _name(mode: str, days: int) -> str:
    return f"after_days {days}" if mode == "after_days" else mode


def simulate(rows: Sequence[tuple[str, str]], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One simulated mailbox and one fit per setting; the dev scores and the origin counts."""
    import numpy as np

    from mailtriage_trainer.evaluate import Baseline, score_probs

    rng = np.random.default_rng(seed)
    labels = sorted({y for _, y in rows})
    order = rng.permutation(len(rows))
    n_dev = int(len(rows) * 0.2)
    dev = [rows[i] for i in order[:n_dev]]
    pool = [rows[i] for i in order[n_dev:]]
    n_staff = int(len(pool) * args.staff_share)

    def noisy(y: str) -> str:  # a staff member dropping mail into a wrong folder
        return str(rng.choice(labels)) if rng.random() < args.staff_noise else y

    staff = [(t, noisy(y)) for t, y in pool[:n_staff]]
    new = pool[n_staff:]
    arrival = rng.uniform(0.0, args.days, size=len(new))  # days; the retrain is at day args.days
    age = args.days - arrival

    daemon_model = Baseline(labels, seed=seed).fit([t for t, _ in staff], [y for _, y in staff])
    probs = daemon_model.predict_proba([t for t, _ in new])
    predicted = [labels[i] for i in probs.argmax(axis=1)]
    confidence = probs.max(axis=1)
    cut = float(np.quantile(confidence, 1.0 - args.coverage))
    forged_target = str(rng.choice(labels))
    forged = rng.random(len(new)) < args.forged

    corrections: list[tuple[str, str]] = []
    daemon: list[tuple[str, str, float, str]] = []  # text, label it was filed as, age in days, truth
    filed = wrong_filed = 0
    for j, (text, truth) in enumerate(new):
        label = forged_target if forged[j] else predicted[j]
        if not forged[j] and confidence[j] < cut:  # unsure folder: staff sort it when they get to it
            if rng.exponential(args.sort_delay) <= age[j]:
                corrections.append((text, noisy(truth)))
            continue
        filed += 1
        if label != truth:
            wrong_filed += 1
            if rng.random() < args.notice and rng.exponential(args.notice_delay) <= age[j]:
                corrections.append((text, truth))  # moved to the right folder: a correction
                continue
        daemon.append((text, label, float(age[j]), truth))
    daemon_wrong = sum(1 for _, y, _, truth in daemon if y != truth)

    out: dict[str, Any] = {
        "seed": seed, "staff": len(staff), "corrections": len(corrections), "daemon_left": len(daemon),
        "daemon_wrong_left": daemon_wrong, "filed": filed, "filed_accuracy": 1 - wrong_filed / max(filed, 1),
        "dev": len(dev), "settings": {},
    }
    y_dev = [y for _, y in dev]
    for mode, days in SETTINGS:
        kept = [(t, y) for t, y, a, _ in daemon if mode == "include" or (mode == "after_days" and a >= days)]
        train = staff + corrections + kept
        started = time.process_time()
        model = Baseline(labels, seed=seed).fit([t for t, _ in train], [y for _, y in train])
        m = score_probs(y_dev, model.predict_proba([t for t, _ in dev]), labels, (0.6,))
        out["settings"][_name(mode, days)] = {
            "daemon_kept": len(kept), "train": len(train), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "cpu_s": round(time.process_time() - started, 1),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15])
    ap.add_argument("--staff-share", type=float, default=0.3, help="share of the non-dev pool staff sorted")
    ap.add_argument("--staff-noise", type=float, default=0.03, help="share of staff sorting in a wrong folder")
    ap.add_argument("--days", type=float, default=28.0, help="days of new mail before the retrain")
    ap.add_argument("--coverage", type=float, default=0.8, help="share of new mail the daemon files")
    ap.add_argument("--forged", type=float, default=0.02, help="share of new mail forged toward one category")
    ap.add_argument("--notice", type=float, default=0.6, help="chance staff ever move a wrong filing")
    ap.add_argument("--notice-delay", type=float, default=3.0, help="mean days before they do")
    ap.add_argument("--sort-delay", type=float, default=1.0, help="mean days before unsure mail is sorted")
    ap.add_argument("--threads", default="1", help="BLAS/OpenMP threads (set before numpy loads)")
    ap.add_argument("--json", metavar="OUT", help="write every number here too")
    ap.add_argument("--quick", action="store_true", help="1,500 rows, one seed: a plumbing check, never reported")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    with DATA.open(newline="", encoding="utf-8") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh)]
    if args.quick:
        rows, args.seeds = rows[::7], args.seeds[:1]
    started = time.process_time()
    runs = []
    for seed in args.seeds:
        run = simulate(rows, seed, args)
        runs.append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    names = [_name(m, d) for m, d in SETTINGS]
    print("| setting | daemon filings kept | dev accuracy (mean) | dev macro-F1 (mean) | vs exclude (macro-F1, per seed) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name in names:
        got = [r["settings"][name] for r in runs]
        base = [r["settings"]["exclude"]["macro_f1"] for r in runs]
        diffs = ", ".join(f"{(g['macro_f1'] - b) * 100:+.1f}" for g, b in zip(got, base, strict=True))
        mean = {key: sum(g[key] for g in got) / len(got) for key in ("daemon_kept", "accuracy", "macro_f1")}
        print(f"| `{name}` | {mean['daemon_kept']:.0f} | {mean['accuracy']:.1%} | {mean['macro_f1']:.3f} | {diffs} |")
    print("\nper seed: " + "; ".join(
        f"seed {r['seed']}: staff {r['staff']}, corrections {r['corrections']}, daemon filings left "
        f"{r['daemon_left']} ({r['daemon_wrong_left']} wrong), filed accuracy {r['filed_accuracy']:.1%}" for r in runs))
    print(f"CPU {time.process_time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

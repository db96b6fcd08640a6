"""One picture of ``benchmarks.accuracy``: model / TF-IDF / served accuracy, macro-F1 and ECE per data set.

Reads the JSON files that ``python -m benchmarks.accuracy`` wrote into bench-out/ and draws
benchmarks/accuracy.png (committed, small); also prints the RESULTS.md table of the same runs.

    .venv/bin/python -m benchmarks.plot_accuracy [--dataset NAME ...] [--out benchmarks/accuracy.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.accuracy import HEADERS, row
from benchmarks.common import OUT, REPO, md_table, rel

DEFAULT = ("20news", "banking77-full", "banking77-10shot", "clinc150", "bitext")
KINDS = (("model", "fine-tuned MiniLM", "#4c72b0"), ("baseline", "TF-IDF + LR", "#dd8452"),
         ("served", "as served", "#55a868"))


def load(names: Sequence[str]) -> list[dict[str, Any]]:
    runs = []
    for name in names:
        path = OUT / f"accuracy-{name}.json"
        if not path.is_file():
            print(f"skipped {name}: no {rel(path)} (run python -m benchmarks.accuracy --dataset {name})", file=sys.stderr)
            continue
        runs.append(json.loads(path.read_text()))
    return runs


def plot(runs: Sequence[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("accuracy", "accuracy (test)", (0.0, 1.0)), ("macro_f1", "macro-F1 (test)", (0.0, 1.0)),
              ("ece", "ECE (lower is better)", None))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=90)
    width = 0.27
    for ax, (key, title, ylim) in zip(axes, panels, strict=True):
        for k, (kind, label, colour) in enumerate(KINDS):
            xs = [i + (k - 1) * width for i in range(len(runs))]
            ys = [r["test"][kind].get(key, 0.0) for r in runs]
            ax.bar(xs, ys, width, label=label, color=colour)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"{r['dataset']}\n(serves {r['test']['served']['kind']})" for r in runs], fontsize=7)
        ax.set_title(title, fontsize=9)
        if ylim:
            lo = min(r["test"][kind][key] for r in runs for kind, _, _ in KINDS)
            ax.set_ylim(max(0.0, lo - 0.1), 1.0)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("mailtriage held-out test sets: all-MiniLM-L6-v2 LoRA vs TF-IDF vs the version as served "
                 "(benchmarks/RESULTS.md §1)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot_accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", action="append", help=f"repeatable; default: {', '.join(DEFAULT)}")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "accuracy.png"))
    args = ap.parse_args(argv)
    runs = load(args.dataset or DEFAULT)
    if not runs:
        print("nothing to plot", file=sys.stderr)
        return 1
    plot(runs, Path(args.out))
    print(md_table(HEADERS, [row(r) for r in runs]))
    for r in runs:
        if "oos" in r["test"]:
            a = r["test"]["oos"]["auroc"]
            print(f"{r['dataset']}: OOS AUROC of max confidence over {r['test']['oos']['n']} oos_test queries: "
                  f"model {a['model']:.3f}, TF-IDF {a['baseline']:.3f}, served {a['served']:.3f}")
    print(f"wrote {rel(args.out)} ({Path(args.out).stat().st_size // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

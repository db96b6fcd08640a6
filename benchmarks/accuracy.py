"""Held-out accuracy and macro-F1 of the fine-tuned MiniLM next to the TF-IDF baseline and their ensemble.

Four data sets, each trained with the real ``mailtriage-train`` command (subsampled so one run fits
in ~15 min on a 2-core CPU) and scored on data the model never saw:

- ``20news``:   20 Newsgroups *train* archive as folder-sorted mail; per newsgroup the newest 20% by
                article number (the archive has no Date headers; article numbers grow with time) are
                the test set, training mail is drawn from the older 80%.
- ``banking77``: a per-intent subsample of train.csv -> the official test.csv (3,080 queries).
- ``bitext``:    the ``category`` column (11 classes); the trainer's own stratified 20% holdout.
- ``demo``:      demo/corpus.py history (sorted folders) -> its later, unbalanced inbox.

Model numbers on an external test set come from ``mailtriage-train eval --json`` (the product
command); the baseline (fit on the same training mail the trainer used) and the ensemble (plain
average of both probability matrices, nothing tuned) are computed here with the trainer's own code.

    .venv/bin/python -m benchmarks.accuracy [--dataset NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DATASETS,
    ENV,
    OUT,
    base_model,
    bin_path,
    busy_processes,
    loadavg,
    machine,
    md_table,
    rel,
    run_timed,
    tail,
    write_json,
)

SEED = 13
NEWS_TAR = DATASETS / "20news" / "20news-bydate-train.tar.gz"
BANKING_TRAIN = DATASETS / "banking77" / "train.csv"
BANKING_TEST = DATASETS / "banking77" / "test.csv"
BITEXT_CSV = DATASETS / "bitext_customer_support" / "bitext_customer_support_4514.csv"


@dataclass(frozen=True)
class Plan:
    """How much of a data set one run uses; --quick shrinks everything to prove the plumbing."""
    train_per_class: int | None      # None: all of it
    test_per_class: int | None       # None: the whole test set
    epochs: int
    max_length: int
    holdout_fraction: float          # the trainer's internal holdout (the gate's); small when a real test set exists
    learning_rate: float | None = None  # None: the trainer's default (5e-4)


# Sized so each data set runs in about 15 min or less on 2 cores: a 16 x 256-token LoRA step takes
# ~1 s on a quiet machine and 1.5-7 s on a busy one. demo uses the product's default of 8 epochs;
# 20news (all messages >= 256 tokens) gets 4, since 8 took ~30 min on the busy machine; the short-text
# sets converge in fewer.
PLANS: dict[str, Plan] = {
    "20news": Plan(train_per_class=40, test_per_class=40, epochs=4, max_length=256, holdout_fraction=0.1),
    "banking77": Plan(train_per_class=25, test_per_class=None, epochs=6, max_length=64, holdout_fraction=0.1),
    "bitext": Plan(train_per_class=120, test_per_class=None, epochs=5, max_length=64, holdout_fraction=0.1),
    "demo": Plan(train_per_class=40, test_per_class=None, epochs=8, max_length=256, holdout_fraction=0.1),
}
QUICK = {
    "20news": Plan(8, 4, 1, 128, 0.2),
    "banking77": Plan(6, 2, 1, 64, 0.2),
    "bitext": Plan(12, 10, 1, 64, 0.2),
    "demo": Plan(8, None, 1, 128, 0.2),
}
BITEXT_TEST_FRACTION = 0.2
DEMO_INBOX = 300
DEMO_INBOX_QUICK = 60


# ---- data preparation: each returns (train SOURCE, test SOURCE or None, notes) ----------------------


def prep_20news(plan: Plan, work: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    by_group: dict[str, list[tuple[int, tarfile.TarInfo]]] = defaultdict(list)
    tf = tarfile.open(NEWS_TAR, "r:gz")
    members = [m for m in tf.getmembers() if m.isfile()]
    for m in members:
        parts = Path(m.name).parts
        if len(parts) == 3 and parts[2].isdigit():
            by_group[parts[1]].append((int(parts[2]), m))
    rng = random.Random(SEED)
    train_pick: dict[str, list[tarfile.TarInfo]] = {}
    test_pick: dict[str, list[tarfile.TarInfo]] = {}
    for group, items in sorted(by_group.items()):
        items.sort(key=lambda t: t[0])
        cut = len(items) - round(0.2 * len(items))
        older, newest = [m for _, m in items[:cut]], [m for _, m in items[cut:]]
        train_pick[group] = older if plan.train_per_class is None else rng.sample(older, min(plan.train_per_class, len(older)))
        test_pick[group] = newest if plan.test_per_class is None else newest[-plan.test_per_class:]
    # One forward pass in archive order: random access into a .tar.gz re-decompresses from the start.
    dest = {m.name: work / split / group / Path(m.name).name
            for split, pick in (("train", train_pick), ("test", test_pick)) for group, ms in pick.items() for m in ms}
    tf.close()
    tf = tarfile.open(NEWS_TAR, "r:gz")
    for m in tf:
        target = dest.get(m.name)
        if target is not None:
            fh = tf.extractfile(m)
            assert fh is not None
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fh.read())
    tf.close()
    return work / "train", work / "test", {
        "split": "per newsgroup: newest 20% by article number = test; training mail sampled from the older 80%",
        "groups": len(by_group),
        "archive_messages": len(members),
    }


def _write_csv(path: Path, rows: Sequence[dict[str, str]], fields: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})


def _per_class_sample(rows: Sequence[dict[str, str]], label: str, n: int | None, rng: random.Random) -> list[dict[str, str]]:
    if n is None:
        return list(rows)
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[r[label]].append(r)
    out: list[dict[str, str]] = []
    for key in sorted(groups):
        g = groups[key]
        out.extend(rng.sample(g, min(n, len(g))))
    return out


def prep_banking77(plan: Plan, work: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    rng = random.Random(SEED)
    train_rows = list(csv.DictReader(BANKING_TRAIN.open(encoding="utf-8")))
    sample = _per_class_sample(train_rows, "category", plan.train_per_class, rng)
    train = work / "banking77-train-sample.csv"
    _write_csv(train, sample, ["text", "category"])
    test = BANKING_TEST
    if plan.test_per_class is not None:
        test = work / "banking77-test-sample.csv"
        _write_csv(test, _per_class_sample(list(csv.DictReader(BANKING_TEST.open(encoding="utf-8"))), "category",
                                           plan.test_per_class, rng), ["text", "category"])
    return train, test, {"split": "train.csv subsample -> test.csv", "train_rows_available": len(train_rows)}


def prep_bitext(plan: Plan, work: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """A seeded stratified 20% of every category is the test set; training rows are drawn from the rest."""
    rows = list(csv.DictReader(BITEXT_CSV.open(encoding="utf-8")))
    rng = random.Random(SEED)
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[r["category"]].append(r)
    pool: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for key in sorted(groups):
        g = list(groups[key])
        rng.shuffle(g)
        k = round(BITEXT_TEST_FRACTION * len(g))
        test.extend(g[:k])
        pool.extend(g[k:])
    fields = ["instruction", "category"]  # what the trainer would pick from the full file itself
    _write_csv(work / "bitext-train.csv", _per_class_sample(pool, "category", plan.train_per_class, rng), fields)
    _write_csv(work / "bitext-test.csv", _per_class_sample(test, "category", plan.test_per_class, rng), fields)
    return work / "bitext-train.csv", work / "bitext-test.csv", {
        "split": f"seeded stratified {BITEXT_TEST_FRACTION:.0%} of each category = test; training rows drawn from the rest",
        "text_column": "instruction", "label_column": "category", "rows": len(rows)}


def prep_demo(plan: Plan, work: Path, quick: bool) -> tuple[Path, Path | None, dict[str, Any]]:
    from demo.corpus import LABELS_FILE, generate

    inbox = DEMO_INBOX_QUICK if quick else DEMO_INBOX
    summary = generate(work / "corpus", per_category=plan.train_per_class or 60, inbox=inbox, seed=7)
    answers = json.loads((work / "corpus" / LABELS_FILE).read_text())
    for name, label in answers.items():
        folder = work / "inbox-sorted" / label
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "corpus" / "inbox" / name, folder / name)
    return work / "corpus" / "history", work / "inbox-sorted", {
        "split": "history (first 150 days, balanced) -> inbox (next 30 days, unbalanced)",
        "generator": f"demo.corpus.generate(per_category={plan.train_per_class or 60}, inbox={inbox}, seed=7)",
        "inbox_per_label": summary.get("inbox_per_label"),
        "html": summary.get("html"), "quoted": summary.get("quoted"), "ambiguous": summary.get("ambiguous"),
    }


# ---- scoring --------------------------------------------------------------------------------------


def train_cmd(data: Path, model_dir: Path, plan: Plan) -> list[str]:
    return [
        bin_path("mailtriage-train"), "--data", str(data), "--base", base_model(), "--model-dir", str(model_dir),
        "--epochs", str(plan.epochs), "--max-length", str(plan.max_length),
        "--holdout-fraction", str(plan.holdout_fraction), "--seed", str(SEED), "--min-examples", "2",
        "--device", "cpu", "--force",
        *(["--learning-rate", str(plan.learning_rate)] if plan.learning_rate else []),
    ]


def _short(m: dict[str, Any]) -> dict[str, Any]:
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def score_external(model_dir: Path, train_src: Path, test_src: Path, plan: Plan, work: Path) -> dict[str, Any]:
    """Model via `mailtriage-train eval --json`; baseline and ensemble in-process on the same test mail."""
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer import dataset, sources
    from mailtriage_trainer.evaluate import Baseline, classifier_probs, ensemble_probs, score_probs

    eval_argv = [bin_path("mailtriage-train"), "eval", "--data", str(test_src), "--model", str(model_dir / "current"),
                 "--max-length", str(plan.max_length), "--device", "cpu", "--json"]
    ev = run_timed(eval_argv, work / "eval.log")
    if ev["rc"] != 0:
        raise SystemExit(f"eval failed ({ev['rc']}):\n{tail(work / 'eval.log')}")
    # The log holds stderr (structlog) and stdout (the one JSON line); the JSON line is the last '{' line.
    lines = [ln for ln in (work / "eval.log").read_text().splitlines() if ln.startswith('{"n"')]
    product = json.loads(lines[-1])

    # Reproduce the trainer's split so the baseline learns from exactly the mail the model learned from.
    pool, _ = dataset.dedupe(sources.load_source(train_src, progress=False))
    train_all, _holdout = dataset.split(pool, plan.holdout_fraction, SEED)
    test, _ = dataset.dedupe(sources.load_source(test_src, progress=False))
    train_hashes = {dataset.content_hash(e.text) for e in pool}
    overlap = sum(dataset.content_hash(e.text) in train_hashes for e in test)

    clf = load_classifier(model_dir / "current", device="cpu", batch_size=16, max_length=plan.max_length)
    # A version may serve the ensemble (manifest "serve"); the MiniLM row is the fine-tuned model alone.
    served_kind = getattr(clf, "serve", "model")
    if getattr(clf, "baseline", None) is not None:
        clf.baseline = None
    labels = list(clf.labels)
    texts, y = [e.text for e in test], [e.label for e in test]
    started = time.monotonic()
    model_p = classifier_probs(clf, texts, labels, batch_size=64, progress=False)
    infer_s = time.monotonic() - started
    base = Baseline(labels, seed=SEED).fit([e.text for e in train_all], [e.label for e in train_all])
    base_p = base.predict_proba(texts)
    model = score_probs(y, model_p, labels)
    ens = score_probs(y, ensemble_probs(model_p, base_p), labels)
    expected = model if served_kind == "model" else ens
    if abs(expected["accuracy"] - product["accuracy"]) > 1e-9:
        print(f"WARNING: eval CLI accuracy {product['accuracy']} (serves {served_kind}) != in-process "
              f"{expected['accuracy']}", file=sys.stderr)
    return {
        "model": _short(model),
        "served": {"kind": served_kind, **_short(product)},  # `mailtriage-train eval`: the version as served
        "baseline": _short(score_probs(y, base_p, labels)),
        "ensemble": _short(ens),
        "model_coverage": product.get("coverage"),
        "eval_cli": ev,
        "eval_command": " ".join(eval_argv),
        "test_n": len(test),
        "test_texts_also_in_training_pool": overlap,
        "in_process_inference_s": round(infer_s, 1),
        "baseline_train_n": len(train_all),
    }


def run_case(name: str, quick: bool, keep: bool, overrides: dict[str, Any], tag: str) -> dict[str, Any]:
    plan = replace((QUICK if quick else PLANS)[name], **overrides)
    work = Path(tempfile.mkdtemp(prefix=f"mt-bench-{name}-"))
    model_dir = OUT / "models" / (name + tag)
    shutil.rmtree(model_dir, ignore_errors=True)  # a fresh directory: no gate run against an older version
    try:
        if name == "20news":
            train_src, test_src, notes = prep_20news(plan, work)
        elif name == "banking77":
            train_src, test_src, notes = prep_banking77(plan, work)
        elif name == "bitext":
            train_src, test_src, notes = prep_bitext(plan, work)
        else:
            train_src, test_src, notes = prep_demo(plan, work, quick)
        load_before = loadavg()
        argv = train_cmd(train_src, model_dir, plan)
        log_path = OUT / "logs" / f"accuracy-{name}{tag}-train.log"
        tr = run_timed(argv, log_path)
        if tr["rc"] != 0:
            raise SystemExit(f"mailtriage-train failed ({tr['rc']}):\n{tail(log_path)}")
        manifest = json.loads((model_dir / "current" / "manifest.json").read_text())
        training = manifest.get("training", {})
        result = training.get("result", training)
        # Newer trainers keep "metrics" for the version as served and "model_metrics" for the model alone.
        internal = {k: _short(manifest[src]) for k, src in (
            ("metrics", "model_metrics" if "model_metrics" in manifest else "metrics"),
            ("baseline_metrics", "baseline_metrics"), ("ensemble_metrics", "ensemble_metrics")) if src in manifest}
        internal["serve"] = manifest.get("serve", "model")
        out: dict[str, Any] = {
            "dataset": name,
            "quick": quick,
            "plan": plan.__dict__,
            "notes": notes,
            "train_command": " ".join(argv),
            "train": tr,
            "loadavg_before_train": load_before,
            "loadavg_after_train": loadavg(),
            "data": manifest.get("data", {}),
            "finetune": {k: result.get(k) for k in ("train_seconds", "peak_rss_mb", "steps", "best_epoch",
                                                    "stopped_early", "val_accuracy", "val_macro_f1", "history")},
            "trainer_holdout": internal,
        }
        if test_src is not None:
            out["test"] = score_external(model_dir, train_src, test_src, plan, work)
        else:
            h = manifest["data"]["holdout"]["n"]
            out["test"] = {"model": internal["metrics"], "baseline": internal["baseline_metrics"],
                           "ensemble": internal["ensemble_metrics"], "test_n": h,
                           "served": {"kind": internal["serve"]}}
        out["n_train"] = manifest["data"]["train"]["n"]
        out["n_val"] = manifest["data"]["validation"]["n"]
        out["classes"] = len(manifest["labels"])
        return out
    finally:
        if keep:
            print(f"kept work dir {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def row(r: dict[str, Any]) -> list[Any]:
    t = r["test"]
    per_class = r["plan"]["train_per_class"]
    ft = r["finetune"]

    def m(key: str) -> str:
        return f"{t[key]['accuracy']:.1%} / {t[key]['macro_f1']:.3f}"

    return [
        r["dataset"],
        f"{r['classes']}",
        f"{r['n_train']} (+{r['n_val']} val)" + (f", {per_class}/class drawn" if per_class else ", all"),
        t["test_n"],
        m("model"), m("baseline"), m("ensemble"),
        f"{r['plan']['epochs']} ep (best {ft.get('best_epoch')}), {ft.get('train_seconds') or 0:.0f} s"
        + (f", lr {r['plan']['learning_rate']:g}" if r["plan"].get("learning_rate") else "")
        + (f"; serves {t['served']['kind']}" if t.get("served", {}).get("kind", "model") != "model" else ""),
    ]


HEADERS = ["data set", "classes", "train examples", "test n", "MiniLM acc / macro-F1",
           "TF-IDF acc / macro-F1", "ensemble acc / macro-F1", "fine-tune"]


def set_threads(setting: str) -> str:
    """Pin torch threads for the children (env) and this process; returns what was chosen."""
    import os

    import torch

    if setting == "auto":
        cores = os.cpu_count() or 1
        setting = "1" if loadavg()[0] > cores else "default"
    if setting != "default":
        ENV["OMP_NUM_THREADS"] = setting
        torch.set_num_threads(int(setting))
    return setting


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", action="append", choices=sorted(PLANS), help="repeatable; default: all four")
    ap.add_argument("--quick", action="store_true", help="tiny subsamples, 1 epoch: checks the plumbing only")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folders")
    ap.add_argument("--threads", default="auto",
                    help="torch threads for training/eval (OMP_NUM_THREADS); 'auto' = 1 when the load average "
                         "exceeds the core count (2 spinning threads on a busy 2-core box run ~3x slower), "
                         "else torch's default. Accuracy does not depend on it; time does.")
    ap.add_argument("--epochs", type=int, help="override the plan's epochs (named in the JSON file)")
    ap.add_argument("--learning-rate", type=float, help="override the trainer's learning rate (named in the JSON file)")
    args = ap.parse_args(argv)
    names = args.dataset or ["demo", "bitext", "banking77", "20news"]
    overrides: dict[str, Any] = {}
    tag = "-quick" if args.quick else ""
    if args.epochs:
        overrides["epochs"] = args.epochs
        tag += f"-ep{args.epochs}"
    if args.learning_rate:
        overrides["learning_rate"] = args.learning_rate
        tag += f"-lr{args.learning_rate:g}"
    threads = set_threads(args.threads)
    info = machine()
    info["threads_setting"] = threads
    info["busy_at_start"] = busy_processes()
    rows = []
    for name in names:
        started = time.monotonic()
        print(f"== {name}", file=sys.stderr, flush=True)
        r = run_case(name, args.quick, args.keep, overrides, tag)
        r["wall_s"] = round(time.monotonic() - started, 1)
        r["machine"] = info
        r["command"] = f".venv/bin/python -m benchmarks.accuracy --dataset {name}" + (" --quick" if args.quick else "") \
            + (f" --epochs {args.epochs}" if args.epochs else "") \
            + (f" --learning-rate {args.learning_rate:g}" if args.learning_rate else "") \
            + (f" --threads {args.threads}" if args.threads != "auto" else "")
        path = write_json(f"accuracy-{name}{tag}", r)
        rows.append(row(r))
        print(md_table(HEADERS, [rows[-1]]), flush=True)
        print(f"   ({r['wall_s']:.0f} s wall; JSON: {rel(path)})", flush=True)
    if len(rows) > 1:
        print()
        print(md_table(HEADERS, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

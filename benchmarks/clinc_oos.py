"""CLINC150: in-scope accuracy and out-of-scope detection from confidence alone.

No OOS class is trained: the fine-tuned MiniLM (the real ``mailtriage-train``, temperature-scaled
on its validation slice) and the TF-IDF baseline learn the 150 intents from a fixed per-intent
subset of ``train`` (the first K queries of each intent in file order). On the official test split:
in-scope accuracy and ECE; OOS AUROC of max-confidence (in-scope vs ``oos_test``); OOS recall and
in-scope accuracy at the threshold that maximises accuracy on ``val`` + ``oos_val`` (with OOS
counted right when it falls below the threshold), so the threshold is never tuned on the test set.

    .venv/bin/python -m benchmarks.clinc_oos [--per-intent 20] [--epochs 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DATASETS

DATA = DATASETS / "clinc150" / "data_full.json"


def _threshold_on_val(conf_in: np.ndarray, right_in: np.ndarray, conf_oos: np.ndarray) -> float:
    best_t, best_acc = 0.0, -1.0
    for t in np.unique(np.concatenate([conf_in, conf_oos, [0.0]])):
        acc = ((right_in & (conf_in >= t)).sum() + (conf_oos < t).sum()) / (len(conf_in) + len(conf_oos))
        if acc > best_acc:
            best_t, best_acc = float(t), float(acc)
    return best_t


def score(name: str, predict: Any, data: dict[str, list[list[str]]], labels: list[str]) -> dict[str, Any]:
    from mailtriage_trainer.evaluate import expected_calibration_error, ood_auroc

    def run(split: str) -> tuple[np.ndarray, list[str]]:
        texts = [t for t, _ in data[split]]
        return predict(texts), [y for _, y in data[split]]

    p_val, y_val = run("val")
    p_oos_val, _ = run("oos_val")
    p_test, y_test = run("test")
    p_oos, _ = run("oos_test")
    right_val = np.array([labels[i] == y for i, y in zip(p_val.argmax(1), y_val, strict=True)])
    t = _threshold_on_val(p_val.max(1), right_val, p_oos_val.max(1))
    conf_test, conf_oos = p_test.max(1), p_oos.max(1)
    right = np.array([labels[i] == y for i, y in zip(p_test.argmax(1), y_test, strict=True)])
    return {
        "name": name,
        "in_scope_accuracy": float(right.mean()),
        "in_scope_ece": expected_calibration_error(y_test, p_test, labels),
        "oos_auroc": ood_auroc(conf_test, conf_oos),
        "threshold_from_val": t,
        "oos_recall_at_threshold": float((conf_oos < t).mean()),
        "in_scope_accuracy_at_threshold": float((right & (conf_test >= t)).mean()),
        "in_scope_coverage_at_threshold": float((conf_test >= t).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-intent", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--skip-model", action="store_true", help="baseline rows only (seconds)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    data = json.loads(DATA.read_text())
    seen: dict[str, int] = {}
    train = []
    for text, label in data["train"]:
        if seen.get(label, 0) < args.per_intent:
            seen[label] = seen.get(label, 0) + 1
            train.append((text, label))
    labels = sorted(seen)
    rows = []

    from mailtriage_trainer.evaluate import Baseline

    t0 = time.time()
    base = Baseline(labels, seed=13).fit([t for t, _ in train], [y for _, y in train])
    rows.append({**score("TF-IDF baseline", base.predict_proba, data, labels), "seconds": round(time.time() - t0, 1)})
    print(json.dumps(rows[-1]), flush=True)

    if not args.skip_model:
        from mailtriage.model import modeldir
        from mailtriage.model.transformers import load_classifier
        from mailtriage_trainer.cli import main as train_main
        from mailtriage_trainer.evaluate import classifier_probs

        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "train.csv"
            with csv_path.open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["text", "label"])
                w.writerows(train)
            t0 = time.time()
            cmd = ["--data", str(csv_path), "--base", "all-MiniLM-L6-v2", "--model-dir", f"{tmp}/models",
                   "--device", "cpu", "--max-length", str(args.max_length), "--epochs", str(args.epochs),
                   "--min-examples", "5", "--serve", "model", "--force"]
            print("mailtriage-train " + " ".join(cmd), file=sys.stderr, flush=True)
            rc = train_main(cmd)
            if rc != 0:
                print(f"training failed: exit {rc}", file=sys.stderr)
                return rc
            train_s = time.time() - t0
            version = modeldir.current_version(Path(tmp) / "models")
            assert version is not None
            manifest = modeldir.read_manifest(version)
            clf = load_classifier(version, device="cpu", batch_size=64, max_length=args.max_length)
            row = score("fine-tuned MiniLM (temperature-scaled)",
                        lambda texts: classifier_probs(clf, texts, labels, batch_size=64, progress=False), data, labels)
            row.update(seconds=round(time.time() - t0, 1), train_seconds=round(train_s, 1),
                       temperature=manifest.get("temperature"), calibration=manifest.get("calibration"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

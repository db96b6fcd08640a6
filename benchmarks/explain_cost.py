"""What an explanation costs per message: the TF-IDF words, the record, the stored JSON.

The daemon asks its classifier for evidence with every batch (``classify_explained``), so this is
what every decision pays on top of classifying. Only the TF-IDF part costs anything: the part name,
the weight and the top labels are already known. Measured on the demo mailbox with the trainer's
baseline (word 1-2 grams + char_wb 2-5 grams, logistic regression) fitted on its history:

- baseline served alone: ``classify`` vs ``classify_explained`` (same TF-IDF features, plus the
  contributions);
- an ensemble: the contributions alone (its features are computed for its scores anyway);
- a model-only version with a baseline.npz ("TF-IDF view"): vectorizing + contributions, all extra;
- routing's record (``explain``), ``to_json`` and the ``X-Mailtriage-Why`` line.

Each figure is the median of ``--repeat`` runs over the inbox, per message, at batch 1 and 32;
the 1-minute load average is recorded (the machine may be shared).

    .venv/bin/python -m benchmarks.explain_cost [--per-category 40] [--inbox 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import loadavg, machine, md_table, write_json


def _per_message_ms(fn: Callable[[Sequence[str]], Any], texts: Sequence[str], batch: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            fn(texts[i:i + batch])
        runs.append((time.perf_counter() - started) * 1000 / len(texts))
    return statistics.median(runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--inbox", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    from demo.corpus import CATEGORIES, generate
    from mailtriage.core import explain
    from mailtriage.core.mailtext import mail_text
    from mailtriage.model import ensemble
    from mailtriage.model.manifest import Manifest
    from mailtriage_trainer.evaluate import Baseline

    labels = tuple(CATEGORIES)
    with tempfile.TemporaryDirectory(prefix="mailtriage-explain-") as tmp:
        corpus, version = Path(tmp) / "corpus", Path(tmp) / "v1"
        version.mkdir()
        generate(corpus, per_category=args.per_category, inbox=args.inbox, seed=7)
        history = [(mail_text(f.read_bytes()), label) for label in labels
                   for f in sorted((corpus / "history" / label).iterdir())]
        inbox = [mail_text(f.read_bytes()) for f in sorted((corpus / "inbox").iterdir())]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Baseline(labels).fit([t for t, _ in history], [y for _, y in history]).save(version)
        tfidf = ensemble.load_baseline(version, labels)
        clf = ensemble.BaselineClassifier(tfidf, labels, path=version, manifest=Manifest())
        vocabulary = sum(len(v.vocabulary) for v in ensemble._linear(tfidf).vectorizers)  # type: ignore[union-attr]

        def ensemble_words(texts: Sequence[str]) -> Any:
            # What an ensemble adds: its features and probabilities exist already; only the words are new.
            probs, features = ensemble.baseline_scored(tfidf, texts, labels)
            started = time.perf_counter()
            ensemble.explained_predictions(probs, labels, texts, part="ensemble", weight=0.5, tfidf=tfidf,
                                           features=features)
            return time.perf_counter() - started

        def view(texts: Sequence[str]) -> Any:
            probs = ensemble.baseline_probs(tfidf, texts, labels)  # stands in for the model's probabilities
            started = time.perf_counter()
            ensemble.explained_predictions(probs, labels, texts, part="model", tfidf=tfidf, role=explain.ROLE_VIEW)
            return time.perf_counter() - started

        preds = clf.classify_explained(inbox)

        def record(_texts: Sequence[str]) -> None:
            for p in preds[: len(_texts)]:
                e = explain.explain(p.evidence, p.label, p.confidence, p.scores, 0.6, p.confidence < 0.6, "v1")
                e.to_json()
                explain.why_header(e)

        def timed_only(fn: Callable[[Sequence[str]], float], batch: int) -> float:
            runs = []
            for _ in range(args.repeat):
                spent = sum(fn(inbox[i:i + batch]) for i in range(0, len(inbox), batch))
                runs.append(spent * 1000 / len(inbox))
            return statistics.median(runs)

        clf.classify_explained(inbox[:8])  # warm-up: builds the term table once
        before = loadavg()
        rows = []
        for batch in (1, 32):
            plain = _per_message_ms(clf.classify, inbox, batch, args.repeat)
            explained = _per_message_ms(clf.classify_explained, inbox, batch, args.repeat)
            rows.append(["baseline alone: classify", batch, f"{plain:.3f}", ""])
            rows.append(["baseline alone: classify_explained", batch, f"{explained:.3f}", f"+{explained - plain:.3f}"])
            words = timed_only(ensemble_words, batch)
            rows.append(["ensemble: the words (features reused)", batch, "", f"+{words:.3f}"])
            seen = timed_only(view, batch)
            rows.append(["model alone: TF-IDF view (vectorize + words)", batch, "", f"+{seen:.3f}"])
        rec = _per_message_ms(record, inbox, 32, args.repeat)
        rows.append(["record + to_json + why_header", "-", "", f"+{rec:.3f}"])
        sizes = [len(explain.explain(p.evidence, p.label, p.confidence, p.scores, 0.6, False, "v1").to_json().encode())
                 for p in preds]
        after = loadavg()

    table = md_table(["what", "batch", "ms/message", "explanation adds ms/message"], rows)
    print(table)
    print(f"\nstored JSON: median {statistics.median(sizes)} bytes, max {max(sizes)} (bound {explain.MAX_JSON_BYTES}); "
          f"{len(inbox)} inbox mails, baseline of {len(history)} mails, {vocabulary} features; "
          f"load average {before[0]:.2f} -> {after[0]:.2f}")
    write_json("explain_cost", {"rows": rows, "json_bytes": {"median": statistics.median(sizes), "max": max(sizes)},
                                "inbox": len(inbox), "history": len(history), "features": vocabulary,
                                "loadavg_before": before, "loadavg_after": after, "machine": machine(),
                                "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Turn a version's manifest into what a person reads: report.md and confusion.png.

The report is rendered from the manifest alone, so it can never disagree with the numbers the
gate used, and can be re-rendered from any old version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailtriage.model.manifest import Manifest

REPORT_FILE = "report.md"
CONFUSION_FILE = "confusion.png"


def write_report(version_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write report.md (and confusion.png when the manifest has a confusion matrix); returns the report."""
    version_dir = Path(version_dir)
    served = manifest.get("metrics") or {}  # as served: the model alone or the ensemble
    if served.get("confusion"):
        title = (
            f"{manifest.get('version', version_dir.name)} ({_served_name(manifest)}): "
            f"accuracy {_pct(served['accuracy'])}, macro-F1 {served['macro_f1']:.3f} (n={served['n']})"
        )
        plot_confusion(served["confusion"], served["labels"], version_dir / CONFUSION_FILE, title)
    path = version_dir / REPORT_FILE
    path.write_text(render_markdown(manifest, confusion_png=(version_dir / CONFUSION_FILE).is_file()),
                    encoding="utf-8")
    return path


@dataclass(frozen=True)
class _Parts:
    """The manifest entries the sections read, with the defaults of older manifests filled in."""

    manifest: dict[str, Any]   # the sections that have no typed field (data, training, calibration, target)
    typed: Manifest            # the fields the daemon serves by, checked as the loader checks them
    served: dict[str, Any]     # the version as served
    model: dict[str, Any]      # the fine-tuned model alone
    baseline: dict[str, Any]
    ensemble: dict[str, Any]
    serve: str
    gate: dict[str, Any]
    data: dict[str, Any]
    threshold: float | None

    @classmethod
    def of(cls, m: dict[str, Any]) -> _Parts:
        # "metrics" is the version as served; "model_metrics" the fine-tuned model alone (manifests from
        # before ensemble serving have only "metrics", which was the model alone and served).
        typed = Manifest.from_dict(m)
        served: dict[str, Any] = dict(typed.metrics)
        return cls(
            manifest=m, typed=typed, served=served, model=m.get("model_metrics") or served,
            baseline=m.get("baseline_metrics") or {}, ensemble=m.get("ensemble_metrics") or {}, serve=typed.serve,
            gate=dict(typed.gate), data=m.get("data") or {}, threshold=typed.threshold,
        )


def render_markdown(manifest: dict[str, Any], confusion_png: bool = True) -> str:
    """report.md: one section after the other, each from its own part of the manifest."""
    p = _Parts.of(manifest)
    sections = [_head(p), _gate(p)]
    if p.served:
        sections += [_held_out(p), _per_class(p), _calibration(p), _target(p), _thresholds(p)]
    sections += [_data(p), _origins(p), _training(p)]
    if confusion_png and p.served:
        sections.append(_confusion(p))
    return "\n".join(line for section in sections for line in section)


def _head(p: _Parts) -> list[str]:
    m = p.manifest
    out = [f"# mailtriage model {m.get('version', '?')}", ""]
    if p.gate:
        out += [f"**{_gate_headline(p.gate)}**", ""]
    return out + [
        f"- created: {m.get('created', '?')}",
        f"- base model: `{m.get('base_model', '?')}`",
        f"- mail-text version: {m.get('mailtext_version', '?')}",
        f"- labels ({len(m.get('labels', []))}): {', '.join(m.get('labels', []))}",
        "",
    ]


def _gate(p: _Parts) -> list[str]:
    return ["## Gate", "", p.gate.get("reason", ""), ""] if p.gate else []


def _held_out(p: _Parts) -> list[str]:
    split = p.data.get("split")
    return [
        "## Held-out results",
        "",
        f"Measured on {p.model.get('n', 0)} held-out messages" + (f" (split: {split})" if split else "")
        + ". The gate compares macro-F1: the mean of per-class F1, so small classes count as much as big ones.",
        "",
        *_results_table(p),
        "",
        *_warnings(p),
        *_serve_sentence(p),
    ]


def _results_table(p: _Parts) -> list[str]:
    threshold = p.threshold
    thr_head = f" | coverage @ {threshold:g} | accuracy on covered" if threshold is not None else ""
    out = ["| | accuracy | macro-F1" + thr_head + " |",
           "|---|---:|---:" + ("|---:|---:" if threshold is not None else "") + "|"]
    for name, r in _result_rows(p):
        line = f"| {name} | {_pct(r['accuracy'])} | {r['macro_f1']:.3f}"
        if threshold is not None:
            t = _threshold_row(r, threshold)
            line += f" | {_pct(t['coverage'])} | {_pct(t['accuracy_on_covered'])}" if t else " | | "
        out.append(line + " |")
    return out


def _result_rows(p: _Parts) -> list[tuple[str, dict[str, Any]]]:
    def served(name: str) -> str:
        return " (served)" if p.serve == name else ""

    rows: list[tuple[str, dict[str, Any]]] = [("fine-tuned model alone" + served("model"), p.model)]
    if p.baseline:
        rows.append(("TF-IDF + logistic regression baseline" + served("baseline"), p.baseline))
    if p.ensemble:
        w = p.typed.ensemble_weight
        rows.append((f"ensemble ({w:.1f} x model + {1 - w:.1f} x baseline)" + served("ensemble"), p.ensemble))
    current = p.gate.get("current_metrics")
    if current:
        rows.append((f"current version {p.gate.get('current_version')}", current))
    return rows


def _warnings(p: _Parts) -> list[str]:
    out: list[str] = []
    if p.baseline and p.baseline["macro_f1"] - p.model["macro_f1"] > 0.05:
        out += [f"**Warning:** the TF-IDF baseline beats the fine-tuned model by "
                f"{p.baseline['macro_f1'] - p.model['macro_f1']:.3f} macro-F1. The fine-tune is probably "
                "undertrained (more epochs or a higher learning rate), or the base model is too weak for "
                "this mail.", ""]
    configured = _threshold_row(p.served, p.threshold) if p.threshold is not None else None
    if configured and configured["coverage"] < 0.5:
        out += [f"**Warning:** at the configured threshold {p.threshold:g} only {_pct(configured['coverage'])} of "
                "held-out mail would be filed; the rest would go to the unsure folder. The model is "
                "under-confident (train longer) or the threshold is too high for it; see the table below.", ""]
    return out


def _serve_sentence(p: _Parts) -> list[str]:
    m = p.manifest
    if m.get("serve_reason"):
        out = [m["serve_reason"] + " The numbers below and the gate are the served version's."]
        if m.get("refit"):
            out.append(f"After the gate, the served parts ({', '.join(m['refit']['parts'])}) were retrained on all "
                       f"{m['refit']['examples']} labelled messages (training.refit_all); the held-out numbers are "
                       "those of the gated fit.")
        return [*out, ""]
    if not p.ensemble:
        return []
    # Manifests from before the serve reason was recorded.
    parts = f"the fine-tuned model alone ({p.model['macro_f1']:.3f})" + (
        f" and the baseline alone ({p.baseline['macro_f1']:.3f})" if p.baseline else "")
    if p.serve == "ensemble":
        return [f"Served: the ensemble, because its held-out macro-F1 {p.ensemble['macro_f1']:.3f} beats {parts}.", ""]
    return [f"Served: the fine-tuned model alone (ensemble {p.ensemble['macro_f1']:.3f}, {parts}).", ""]


def _per_class(p: _Parts) -> list[str]:
    has_base = bool(p.baseline.get("per_class"))
    out = [f"## Per class ({_served_name(p.manifest)})", "",
           "| label | precision | recall | F1 | support" + (" | baseline F1" if has_base else "") + " |",
           "|---|---:|---:|---:|---:" + ("|---:" if has_base else "") + "|"]
    for label, pc in p.served["per_class"].items():
        line = (f"| {_cell(label)} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} "
                f"| {pc['support']}")
        if has_base:
            b = p.baseline["per_class"].get(label)
            line += f" | {b['f1']:.3f}" if b else " | "
        out.append(line + " |")
    out.append("")
    pairs = _confused_pairs(p.served)
    if pairs:
        out += ["Most frequent confusions (true -> predicted): "
                + "; ".join(f"{_cell(t)} -> {_cell(q)} ({n})" for t, q, n in pairs) + ".", ""]
    return out


def _calibration(p: _Parts) -> list[str]:
    cal = p.manifest.get("calibration")
    if not cal:
        return []
    out = ["## Calibration", "",
           f"Temperature scaling fitted on {cal['fitted_on']} validation messages: T = {cal['temperature']:g}. "
           f"Expected calibration error of the model on held-out mail: {cal['ece_before']:.3f} before, "
           f"{cal['ece_after']:.3f} after (0 = confidences match accuracy). Served with T applied."]
    bcal = cal.get("baseline")
    if bcal:
        out += ["", f"The TF-IDF baseline's confidences have their own temperature (fitted on the same validation "
                    f"messages with a baseline that did not train on them): T = {bcal['temperature']:g}; ECE on "
                    f"held-out mail {bcal['ece_before']:.3f} before, {bcal['ece_after']:.3f} after. The baseline and "
                    "the ensemble are served with it."]
    ecal = cal.get("ensemble")
    if ecal:
        out += ["", f"The ensemble (the average of the two calibrated parts, under-confident where they disagree) "
                    f"has a third temperature, fitted on the same validation messages: T = {ecal['temperature']:g}; "
                    f"ECE on held-out mail {ecal['ece_before']:.3f} before, {ecal['ece_after']:.3f} after."]
    return [*out, ""]


def _target(p: _Parts) -> list[str]:
    target = p.manifest.get("target")
    if not target:
        return []
    if target["reached"]:
        line = (f"**Target accuracy {_pct(target['target_accuracy'])}:** threshold {target['threshold']:.4f} "
                f"files {_pct(target['coverage'])} of held-out mail ({target['n_covered']} of {target['n']}) "
                f"at {_pct(target['accuracy_on_covered'])} accuracy; set `model.threshold = "
                f"{target['threshold']:.4f}` to serve it. Derived on the same held-out mail, so slightly optimistic.")
    else:
        line = (f"**Target accuracy {_pct(target['target_accuracy'])}:** not reached at any threshold on held-out "
                "mail; nothing could be filed automatically at that accuracy.")
    return [line, ""]


def _thresholds(p: _Parts) -> list[str]:
    if not p.served.get("thresholds"):
        return []
    out = ["## Confidence threshold", "",
           "Below the threshold a message goes to the unsure folder instead of a category. "
           "Coverage is the share filed automatically; accuracy is measured on that share.", "",
           "| threshold | coverage | accuracy on covered | filed |",
           "|---:|---:|---:|---:|"]
    for t in p.served["thresholds"]:
        mark = " (configured)" if p.threshold is not None and abs(t["threshold"] - p.threshold) < 1e-9 else ""
        out.append(f"| {t['threshold']:g}{mark} | {_pct(t['coverage'])} | {_pct(t['accuracy_on_covered'])} "
                   f"| {t['n_covered']} |")
    return [*out, ""]


def _data(p: _Parts) -> list[str]:
    data = p.data
    if not data:
        return []
    out = ["## Data", "", f"- source: `{data.get('source', '?')}`"]
    if "loaded" in data:
        out.append(f"- loaded {data['loaded']} examples, dropped {data.get('duplicates_dropped', 0)} duplicates")
        out += [f"- skipped {count}: {reason}" for reason, count in sorted((data.get("skipped") or {}).items())]
    if data.get("split"):
        out.append(f"- split: {data['split']}")
    whole = data.get("all") or {}
    if whole.get("date_min"):
        out.append(f"- dates: {whole['date_min']} .. {whole['date_max']} ({whole.get('dated', 0)} dated)")
    parts = [(name, data[name]) for name in ("train", "validation", "holdout") if data.get(name)]
    if whole.get("per_class"):
        out += ["", "| label | all | " + " | ".join(name for name, _ in parts) + " |",
                "|---|---:|" + "---:|" * len(parts)]
        out += [f"| {_cell(label)} | {n} | " + " | ".join(str(q.get("per_class", {}).get(label, 0)) for _, q in parts)
                + " |" for label, n in whole["per_class"].items()]
    return [*out, ""]


def _origins(p: _Parts) -> list[str]:
    counts = dict(p.typed.origins)
    if not counts:
        return []
    from mailtriage_trainer.origins import describe

    truth = "" if counts.get("unchecked") else (" Held-out and validation mail is staff-labelled only (sorted or "
                                                  "corrected by staff): the daemon's own filings are never scored "
                                                  "as truth.")
    return ["## Where the labels came from", "", f"{describe(counts)}.{truth}", ""]


def _training(p: _Parts) -> list[str]:
    training = p.manifest.get("training") or {}
    params = p.manifest.get("params") or {}
    if not (training or params):
        return []
    out = ["## Training", ""]
    for key in ("best_epoch", "val_accuracy", "val_macro_f1", "steps", "train_seconds", "peak_rss_mb"):
        value = training.get(key)
        if value is not None:
            out.append(f"- {key.replace('_', ' ')}: {value:.3f}" if isinstance(value, float) else
                       f"- {key.replace('_', ' ')}: {value}")
    if params:
        out.append("- parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return [*out, ""]


def _confusion(p: _Parts) -> list[str]:
    return ["## Confusion matrix", "", f"![confusion matrix, rows normalized]({CONFUSION_FILE})", ""]


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str) -> None:
    """Row-normalized confusion matrix (each row: where mail of that true class went)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = len(labels)
    size = max(5.0, 0.45 * k + 3.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    try:
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        short = [label if len(label) <= 28 else label[:26] + "…" for label in labels]
        ax.set_xticklabels(short, rotation=45, ha="right", fontsize=8 if k > 12 else 10)
        ax.set_yticklabels([f"{s} ({int(n)})" for s, n in zip(short, rows[:, 0], strict=True)],
                           fontsize=8 if k > 12 else 10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (support)")
        ax.set_title(title, fontsize=10)
        if k <= 25:
            for i in range(k):
                for j in range(k):
                    if counts[i, j]:
                        ax.text(j, i, f"{norm[i, j]:.2f}".lstrip("0") if norm[i, j] < 1 else "1",
                                ha="center", va="center", fontsize=7 if k > 12 else 9,
                                color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _served_name(manifest: dict[str, Any]) -> str:
    return {"ensemble": "served: ensemble of model and baseline",
            "baseline": "served: TF-IDF baseline"}.get(Manifest.from_dict(manifest).serve, "served: fine-tuned model")


def _gate_headline(gate: dict[str, Any]) -> str:
    if gate.get("promoted"):
        return "Promoted to current" + (" (forced)" if gate.get("decision") == "forced" else "") + "."
    if gate.get("decision") == "dry-run":
        return "Not promoted: evaluation only."
    return "Not promoted: the gate refused this version."


def _threshold_row(result: dict[str, Any], threshold: float) -> dict[str, Any] | None:
    for t in result.get("thresholds") or []:
        if abs(t["threshold"] - threshold) < 1e-9:
            return t
    return None


def _confused_pairs(result: dict[str, Any], top: int = 5) -> list[tuple[str, str, int]]:
    labels = result.get("labels") or []
    pairs = [
        (labels[i], labels[j], n)
        for i, row in enumerate(result.get("confusion") or [])
        for j, n in enumerate(row)
        if i != j and n
    ]
    return sorted(pairs, key=lambda p: -p[2])[:top]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")

"""One training run as a row of steps: harvest -> dedupe/split -> fine-tune -> evaluate -> gate ->
report -> promote.

``mailtriage-train`` (cli.py) parses flags into ``Settings`` and prints; the steps live here so a
reader finds the whole run in one place, and each step takes values and returns values. The gate's
rule is in gate.py. Heavy imports (torch, scikit-learn) stay inside the steps that need them, so
``mailtriage-train list`` and ``--help`` start fast.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from mailtriage.core.training import AUTO_FILED_DAYS_DEFAULT, AUTO_FILED_DEFAULT, TrainParams
from mailtriage.errors import ConfigError
from mailtriage_trainer import gate as gating

if TYPE_CHECKING:
    from mailtriage_trainer.origins import Sorted

log = structlog.get_logger(__name__)

# Share of the training split set aside for early stopping; the holdout stays untouched until the end.
VALIDATION_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Settings:
    """One run of `mailtriage-train`: what to train on and how to gate it; the fine-tune's own
    parameters are ``params`` (the one ``TrainParams`` type, validated there)."""

    data: str | None
    base: str
    model_dir: Path | None
    threshold: float
    holdout_fraction: float
    min_examples: int
    params: TrainParams
    serve: str = "auto"
    refit_all: bool = False
    calibrate: bool = True
    target_accuracy: float = 0.0
    auto_filed: str = AUTO_FILED_DEFAULT
    auto_filed_days: int = AUTO_FILED_DAYS_DEFAULT

    def load(self, version_dir: Path, labels: Sequence[str]) -> Any:
        """A saved version, loaded the way the daemon serves it, on this run's device and lengths."""
        from mailtriage.model.transformers import load_classifier

        return load_classifier(version_dir, device=self.params.device, batch_size=self.params.batch_size,
                               max_length=self.params.max_length, expected_labels=labels)

    def check_can_train(self) -> None:
        """A dry run needs neither; a real run must know what to start from and where to write."""
        if not self.base:
            raise ConfigError("no base model: pass --base MODEL (a local model folder, or all-MiniLM-L6-v2) "
                              "or set training.base_model in the config")
        if self.model_dir is None:
            raise ConfigError("no model directory: pass --model-dir DIR or --config with training.model_dir")


@dataclasses.dataclass(frozen=True)
class Data:
    """The labelled mail after hygiene, split; ``info`` is the manifest's "data" entry."""

    labels: list[str]
    train_all: list[Any]      # train + validation: what the version learned from
    train: list[Any]
    val: list[Any]
    holdout: list[Any]
    info: dict[str, Any]
    origins: dict[str, Any] = dataclasses.field(default_factory=dict)  # the manifest's "origins"


@dataclasses.dataclass(frozen=True)
class Outcome:
    version_dir: Path
    manifest: dict[str, Any]
    report: Path

    @property
    def promoted(self) -> bool:
        return bool(self.manifest["gate"]["promoted"])


# ---- harvest, hygiene and split -----------------------------------------------------------------


def prepare(s: Settings, cfg: Any, account: str | None) -> Data:
    """Harvest (a --data source, else the config's IMAP folders), dedupe, check and split."""
    from mailtriage_trainer import dataset, sources

    skipped: Counter[str] = Counter()
    if s.data:
        examples = sources.load_source(s.data, categories=cfg.categories if cfg else None, progress=None,
                                       skipped=skipped)
        source_name = str(s.data)
    elif cfg is not None:
        examples = sources.load_imap(cfg, account=account, progress=None, skipped=skipped)
        source_name = "imap:" + (account or (cfg.accounts[0].name if cfg.accounts else "?"))
    else:
        raise ConfigError("no training data: pass --data SOURCE, or --config with [categories] and "
                          "[[accounts]] to harvest the category folders over IMAP")
    loaded = len(examples)

    examples, dropped = dataset.dedupe(examples)
    labels = list(cfg.labels) if cfg is not None else sources.labels_of(examples)
    by_origin = sort_origins(s, cfg, account, examples)
    examples = [*by_origin.truth, *by_origin.daemon]
    dataset.check_min_examples(examples, s.min_examples, labels)
    # Only staff-labelled mail is held out or validated on: the gate, the temperatures and early
    # stopping must measure the model against people, not against the daemon's own answers.
    truth_train, holdout = dataset.split(by_origin.truth, s.holdout_fraction, s.params.seed)
    truth_fit, val = dataset.split(truth_train, VALIDATION_FRACTION, s.params.seed, name="validation")
    train_all, train = [*truth_train, *by_origin.daemon], [*truth_fit, *by_origin.daemon]
    no_truth = [label for label in labels if not any(e.label == label for e in holdout)]
    if no_truth:
        log.warning("holdout_lacks_classes", labels=no_truth,
                    reason="no staff-labelled mail of these categories to hold out; they are scored on nothing")
    info: dict[str, Any] = {
        "source": source_name,
        "loaded": loaded,
        "skipped": dict(skipped),
        "duplicates_dropped": dropped,
        "split": "time-ordered (newest per class held out)" if dataset.is_time_ordered(examples)
                 else "stratified random",
        "all": dataset.summary(examples, labels),
        "train": dataset.summary(train, labels),
        "validation": dataset.summary(val, labels),
        "holdout": dataset.summary(holdout, labels),
    }
    return Data(labels, list(train_all), list(train), list(val), list(holdout), info, by_origin.counts)


def sort_origins(s: Settings, cfg: Any, account: str | None, examples: Sequence[Any]) -> Sorted:
    """The IMAP/state edge of ``origins``: read the daemon's decisions and the corrections from the
    state database (read-only) and sort ``examples`` by origin under ``training.auto_filed``.

    Without a config or a state database there is no record of what the daemon filed: every example
    counts as staff's, and the log and the report say so. A database that exists but cannot be read
    stops the run (StateError): training on the daemon's own guesses unknowingly is what this avoids.
    """
    from mailtriage_trainer import origins

    policy = origins.Policy(s.auto_filed, s.auto_filed_days)
    if cfg is None:
        sorted_ = origins.unchecked(examples, policy, "no config, so no state database")
    elif not Path(cfg.state_path).is_file():
        sorted_ = origins.unchecked(examples, policy, f"no state database at {cfg.state_path}")
    else:
        from mailtriage.store.corrections import decisions
        from mailtriage.store.state import StateDB

        name = account or (cfg.accounts[0].name if cfg.accounts else "")
        state = StateDB(cfg.state_path, readonly=True)
        try:
            filings = [origins.Filing(r.key, r.label, r.unsure, r.decided_at) for r in decisions(state, name)
                       if r.label is not None]
            corrections = [(r["key"], r["actual"]) for r in state.corrections()]
        finally:
            state.close()
        sorted_ = origins.sort_examples(examples, filings, corrections, policy, now=time.time())
    c = sorted_.counts
    # Harvesting the live folders without the daemon's record may train on its own guesses: a warning.
    (log.warning if c.get("unchecked") and not s.data else log.info)(
        "training_origins", staff=c["staff"], corrections=c["corrections"], daemon=c["daemon"],
        daemon_skipped=c["daemon_skipped"], auto_filed=c["auto_filed"], summary=origins.describe_daemon(c))
    return sorted_


# ---- the run ---------------------------------------------------------------------------------------


def run(s: Settings, cfg: Any, data: Data, *, force: bool, progress: bool) -> Outcome | None:
    """Train a new version, score it, gate it and promote it when the gate says so.

    Under torchrun / accelerate launch every process shares the fine-tune; only rank 0 writes the
    version, and the others return None.
    """
    from mailtriage.model import modeldir
    from mailtriage_trainer import distributed

    assert s.model_dir is not None
    if distributed.world_size() > 1:
        from mailtriage.model.transformers import pick_device

        distributed.start(pick_device(s.params.device))
        if not distributed.is_main():
            # The other processes only share the fine-tune's batches; rank 0 alone writes the version,
            # scores, gates and promotes it.
            try:
                _finetune(s, data.train, data.val, data.labels, None, progress=False)
            finally:
                distributed.stop()
            return None

    with modeldir.exclusive(s.model_dir):
        version_dir = modeldir.new_version_dir(s.model_dir)
        manifest, params, result = _train_version(s, data, version_dir, progress)
        probs = _evaluate_and_choose(s, data, version_dir, manifest, progress)
        serve = manifest["serve"]
        manifest["gate"] = gating.gate(s, cfg, data.labels, data.holdout, probs[serve], manifest["metrics"], force,
                                       progress)
        modeldir.write_manifest(version_dir, manifest)
        check_cpu_serving(s, data, version_dir, manifest, probs[serve])
        if manifest["gate"]["promoted"] and s.refit_all:
            manifest["refit"] = _refit_all(s, version_dir, data.labels, serve, params, result, data.train_all,
                                           data.holdout, data.val, progress)
            modeldir.write_manifest(version_dir, manifest)
        from mailtriage_trainer.report import write_report

        report = write_report(version_dir, manifest)
        if manifest["gate"]["promoted"]:
            modeldir.promote(s.model_dir, version_dir)
    return Outcome(version_dir, manifest, report)


# ---- fine-tune ----------------------------------------------------------------------------------------


def _train_version(
    s: Settings, data: Data, version_dir: Path, progress: bool,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fine-tune into ``version_dir`` and write its first manifest and the keys it trained on:
    (manifest, params, fine-tune result)."""
    from mailtriage.model import modeldir
    from mailtriage_trainer import distributed

    log.info("training_started", version=version_dir.name, base_model=s.base, train=len(data.train),
             validation=len(data.val), holdout=len(data.holdout), labels=len(data.labels))
    try:
        params, result = _finetune(s, data.train, data.val, data.labels, version_dir, progress)
    except BaseException:
        # An adapter that never finished is no version; leave no half directory behind.
        shutil.rmtree(version_dir, ignore_errors=True)
        raise
    finally:
        distributed.stop()  # the fine-tune is the one part shared with other processes
    manifest = _base_manifest(version_dir, s, data.labels, data.info, params, result)
    if data.origins:
        manifest["origins"] = data.origins
    modeldir.write_manifest(version_dir, manifest)  # load_classifier reads base_model from it
    gating.write_train_keys(version_dir, data.train_all)
    return manifest, params, result


def _finetune(
    s: Settings, train: Sequence[Any], val: Sequence[Any], labels: Sequence[str], out_dir: Path | None,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    from mailtriage.model import modeldir
    from mailtriage.core.labels import LabelSet
    from mailtriage_trainer.finetune import finetune

    params = s.params
    result = finetune(
        modeldir.resolve_base_model(s.base),
        [(e.text, e.label) for e in train],
        [(e.text, e.label) for e in val],
        LabelSet(tuple(labels)),
        out_dir,
        params,
        progress=progress,
    )
    return dataclasses.asdict(params), dataclasses.asdict(result)


def _base_manifest(
    version_dir: Path, s: Settings, labels: Sequence[str], data: dict[str, Any],
    params: dict[str, Any], training: dict[str, Any],
) -> dict[str, Any]:
    from mailtriage.model import modeldir
    from mailtriage.core.mailtext import MAILTEXT_VERSION

    manifest: dict[str, Any] = {}
    if (version_dir / modeldir.MANIFEST_FILE).is_file():  # finetune may have recorded its own facts
        manifest = modeldir.read_manifest(version_dir)
    manifest.update({
        "version": version_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": modeldir.base_model_name(s.base),
        "mailtext_version": MAILTEXT_VERSION,
        "labels": list(labels),
        "threshold": s.threshold,
        "data": data,
        "params": params,
        "training": training,
    })
    return manifest


# ---- evaluate and choose what to serve ----------------------------------------------------------------


def _evaluate_and_choose(
    s: Settings, data: Data, version_dir: Path, manifest: dict[str, Any], progress: bool,
) -> dict[str, Any]:
    """Score model, baseline and ensemble (its weight chosen on validation) on the holdout, and serve
    the best of the three unless the config or --serve names one. Fills ``manifest`` in place (and saves
    the baseline when it is served); returns the holdout probabilities of each."""
    from mailtriage.model.ensemble import SERVE_MODEL
    from mailtriage_trainer import evaluate

    scores, probs, baseline = evaluate_all(s, version_dir, data.labels, data.train, data.val, data.train_all,
                                           data.holdout, progress)
    parts = (scores["model_metrics"], scores["baseline_metrics"], scores["ensemble_metrics"])
    serve = evaluate.choose_serve(*parts) if s.serve == "auto" else s.serve
    reason = evaluate.serve_reason(serve, *parts, scores["ensemble_weight"], configured=s.serve != "auto")
    if serve != SERVE_MODEL:
        baseline.save(version_dir)
    # "metrics" is the version as served (what load_classifier gives), so the gate, eval --model and
    # the next run's gate all score the same thing; each part keeps its own row.
    manifest.update(scores, serve=serve, serve_reason=reason, metrics=scores[f"{serve}_metrics"])
    if s.target_accuracy:
        manifest["target"] = evaluate.threshold_for_accuracy([e.label for e in data.holdout], probs[serve],
                                                             data.labels, s.target_accuracy)
        log.info("target_threshold", **manifest["target"])
    log.info("serve_chosen", serve=serve, macro_f1=round(manifest["metrics"]["macro_f1"], 4))
    return probs


def evaluate_all(
    s: Settings, version_dir: Path, labels: Sequence[str], train: Sequence[Any], val: Sequence[Any],
    train_all: Sequence[Any], holdout: Sequence[Any], progress: bool,
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(manifest entries model_metrics, baseline_metrics, ensemble_metrics, ensemble_weight; holdout
    probabilities of "model", "baseline" and "ensemble"; the baseline fitted on train + validation).

    The ensemble weight is chosen on the validation slice with a baseline fitted on the training
    slice only, so nothing about the holdout leaks into it.
    """
    from mailtriage.model.ensemble import BASELINE_TEMPERATURE, ENSEMBLE_TEMPERATURE, temper
    from mailtriage_trainer.evaluate import (
        DEFAULT_THRESHOLDS, Baseline, ensemble_probs, expected_calibration_error, fit_serving, score_probs, softmax,
    )

    thresholds = (*DEFAULT_THRESHOLDS, s.threshold)
    texts = [e.text for e in holdout]
    y = [e.label for e in holdout]
    # Load the saved adapter the way the daemon will: this also proves the version directory is complete.
    clf = s.load(version_dir, labels)
    # Raw logits (the version has no temperature yet), in the classifier's label order = labels.
    hold_logits = clf.logits(texts).numpy() if texts else np.zeros((0, len(labels)))
    val_logits = clf.logits([e.text for e in val]).numpy()
    del clf
    y_val = [e.label for e in val]
    # Temperatures (model, baseline, ensemble) and the ensemble weight come from validation mail only;
    # the holdout only measures what they did. The baseline's temperature is fitted with a baseline
    # that never saw that mail (TF-IDF + LR is far from calibrated: on BANKING77 10-shot its mean
    # confidence was 0.48 at 74% accuracy, so a 0.6 threshold sent two thirds of the mail to unsure).
    val_baseline = Baseline(labels, seed=s.params.seed).fit([e.text for e in train], [e.label for e in train])
    fitted = fit_serving(y_val, val_logits, val_baseline.predict_proba([e.text for e in val]), labels, s.calibrate)
    temperature, base_temperature = fitted.temperature, fitted.baseline_temperature
    weight, ens_temperature = fitted.ensemble_weight, fitted.ensemble_temperature
    model_p = softmax(hold_logits, temperature)
    calibration = {
        "temperature": temperature, "fitted_on": len(val),
        "ece_before": expected_calibration_error(y, softmax(hold_logits), labels),
        "ece_after": expected_calibration_error(y, model_p, labels),
    }
    baseline = Baseline(labels, seed=s.params.seed).fit([e.text for e in train_all], [e.label for e in train_all])
    base_raw = baseline.predict_proba(texts)
    base_p = temper(base_raw, base_temperature)
    calibration["baseline"] = {
        "temperature": base_temperature, "fitted_on": len(val),
        "ece_before": expected_calibration_error(y, base_raw, labels),
        "ece_after": expected_calibration_error(y, base_p, labels),
    }
    probs = {"model": model_p, "baseline": base_p,
             "ensemble": ensemble_probs(model_p, base_p, weight, ens_temperature)}
    calibration["ensemble"] = {
        "temperature": ens_temperature, "fitted_on": len(val),
        "ece_before": expected_calibration_error(y, ensemble_probs(model_p, base_p, weight), labels),
        "ece_after": expected_calibration_error(y, probs["ensemble"], labels),
    }
    out: dict[str, Any] = {
        "model_metrics": score_probs(y, model_p, labels, thresholds),
        "baseline_metrics": score_probs(y, base_p, labels, thresholds),
        "ensemble_metrics": score_probs(y, probs["ensemble"], labels, thresholds),
        "ensemble_weight": weight,
        "temperature": temperature,
        BASELINE_TEMPERATURE: base_temperature,
        ENSEMBLE_TEMPERATURE: ens_temperature,
        "calibration": calibration,
    }
    log.info("holdout_evaluated", holdout=len(holdout), ensemble_weight=weight, temperature=temperature,
             baseline_temperature=base_temperature, ensemble_temperature=ens_temperature,
             ece_before=round(calibration["ece_before"], 4), ece_after=round(calibration["ece_after"], 4),
             **{name: round(out[f"{name}_metrics"]["macro_f1"], 4) for name in ("model", "baseline", "ensemble")})
    return out, probs, baseline


# ---- after the gate: how CPUs serve it ------------------------------------------------------------------


def _int8_allowance(n: int, tolerance: float) -> str:
    """The int8 rule in words: "0.5 points", or "one message (1.7 points)" on a small holdout."""
    return f"{tolerance * 100:.1f} points" if tolerance * n > 1 + 1e-9 else f"one message ({tolerance * 100:.1f} points)"


def check_cpu_serving(s: Settings, data: Data, version_dir: Path, manifest: dict[str, Any], served_probs: Any) -> None:
    """Record in ``manifest["serving"]`` (and save) whether CPUs may serve this version as onnxruntime
    int8, which ``runtime = quantize = "auto"`` then do: only when the int8 graph, served as the daemon
    serves it (temperature, ensemble), scores within 0.5 points of fp32 (``served_probs``) on this
    version's holdout, or within one message on a holdout under 200 (``manifest.int8_tolerance``). Measuring it exports the int8 graph, which stays with the version, so the
    daemon's first load does not pay the export. Encoders only: a decoder's graph is not fused (no
    speed measured) and from 0.5B parameters its fp32 export passes protobuf's 2 GiB limit, so it is
    recorded as torch. A refit after this replaces the adapter: the figures are the gated fit's (as
    the manifest's metrics are), and the daemon's first load exports the refit adapter's graph again.
    """
    from mailtriage.model import modeldir, onnxrt
    from mailtriage.model.ensemble import SERVE_BASELINE
    from mailtriage.model.manifest import int8_keeps_accuracy, int8_tolerance
    from mailtriage.model.transformers import load_classifier

    texts, truth = [e.text for e in data.holdout], [e.label for e in data.holdout]
    fp32 = (float(np.mean(np.argmax(served_probs, axis=1) == np.array([data.labels.index(y) for y in truth])))
            if truth else None)
    record: dict[str, Any] = {"cpu_runtime": "torch", "quantize": "none", "holdout_accuracy_fp32": fp32,
                              "holdout_accuracy_int8": None, "holdout_n": len(truth) or None}
    why: str | None = None
    if manifest["serve"] == SERVE_BASELINE:
        why = "it serves the TF-IDF baseline alone: there is no model to quantize"
    elif fp32 is None:
        why = "there is no holdout to compare int8 with fp32 on"
    elif not onnxrt.available():
        why = "onnxruntime is not installed where it was trained"
    elif (family := onnxrt.model_type(s.base)) not in onnxrt.BERT_LIKE:
        why = (f"its base is a {family}, not a BERT-style encoder: its ONNX graph is not fused and was never "
               "measured faster than torch, and a 0.5B+ decoder's fp32 graph passes protobuf's 2 GiB limit")
    if why is None:
        assert fp32 is not None
        started = time.monotonic()
        try:
            clf = load_classifier(version_dir, device="cpu", batch_size=max(s.params.batch_size, 32),
                                  max_length=s.params.max_length, expected_labels=data.labels,
                                  runtime="onnxruntime", quantize="int8")
            predicted = [p.label for p in clf.classify(texts)]
            del clf
        except Exception as exc:  # export, fusion and quantization raise many types; the version is still good
            why = f"its int8 graph could not be made ({type(exc).__name__}: {exc})"
        else:
            int8 = float(np.mean([p == y for p, y in zip(predicted, truth, strict=True)]))
            record["holdout_accuracy_int8"] = int8
            compared = f"int8 scored {int8:.1%} on the {len(truth)} held-out messages, fp32 {fp32:.1%}"
            allowed = _int8_allowance(len(truth), int8_tolerance(len(truth)))
            if int8_keeps_accuracy(fp32, int8, len(truth)):
                record.update(cpu_runtime="onnxruntime", quantize="int8")
                record["reason"] = f"{compared}: within {allowed}"
            else:
                why = f"{compared}: more than {allowed} below"
            record["seconds"] = round(time.monotonic() - started, 1)
    if why is not None:
        record["reason"] = why
    manifest["serving"] = record
    modeldir.write_manifest(version_dir, manifest)
    log.info("cpu_serving_checked", **record)


# ---- after the gate: refit on everything --------------------------------------------------------------


def _refit_all(
    s: Settings, version_dir: Path, labels: Sequence[str], serve: str, params: dict[str, Any],
    result: dict[str, Any], train_all: Sequence[Any], holdout: Sequence[Any], val: Sequence[Any], progress: bool,
) -> dict[str, Any]:
    """After the gate decided: retrain what the version serves on all labelled mail (train + holdout).

    The held-out metrics in the manifest stay those of the gated fit (the refit has no unseen mail
    left to be scored on). The model is retrained for the best epoch count the gated fit found, with no
    early stopping; the baseline is refitted on everything. The gated adapter is replaced only once
    the refit has finished.
    """
    from mailtriage.model import modeldir
    from mailtriage.model.ensemble import SERVE_MODEL, SERVE_BASELINE
    from mailtriage_trainer.evaluate import Baseline

    everything = [*train_all, *holdout]
    info: dict[str, Any] = {"examples": len(everything), "parts": []}
    if serve != SERVE_BASELINE:
        from mailtriage_trainer.finetune import finetune
        from mailtriage.core.labels import LabelSet

        epochs = int(result.get("best_epoch") or params["epochs"])
        refit_params = TrainParams(**{**params, "epochs": epochs, "patience": epochs + 1})
        tmp = version_dir / ".refit"
        shutil.rmtree(tmp, ignore_errors=True)
        # Validation rows are part of the training data here; they only feed the loop's log.
        finetune(modeldir.resolve_base_model(s.base), [(e.text, e.label) for e in everything],
                 [(e.text, e.label) for e in val], LabelSet(tuple(labels)), tmp, refit_params, progress=progress)
        for f in tmp.iterdir():
            if f.name != modeldir.MANIFEST_FILE:
                os.replace(f, version_dir / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        info["parts"].append("model")
        info["model_epochs"] = epochs
    if serve != SERVE_MODEL:
        Baseline(labels, seed=s.params.seed).fit([e.text for e in everything], [e.label for e in everything]).save(version_dir)
        info["parts"].append("baseline")
    log.info("refit_all_done", **info)
    return info

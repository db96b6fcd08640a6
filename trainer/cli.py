"""`mailtriage-train`: harvest, dedupe, split, fine-tune, evaluate, gate, promote; and `eval`.

Usage:
    mailtriage-train [train] [--config FILE] [--data SOURCE] [--base MODEL] [--model-dir DIR]
                     [--epochs N] [--threshold T] [--force] [--dry-run] ...
    mailtriage-train eval --data SOURCE --model PATH [--json]
    mailtriage-train list [--config FILE | --model-dir DIR] [--json]
    mailtriage-train promote VERSION [--config FILE | --model-dir DIR]     # roll back or forward

Exit codes (a cron job or systemd timer can tell them apart):
    0   trained and promoted (or --dry-run / eval finished)
    3   trained, but the gate refused to promote: the new version scored a lower macro-F1 than the
        current one on the same held-out mail. The version and its report are kept for a look;
        nothing is broken, so a systemd unit may list 3 in SuccessExitStatus=.
    2   a MailtriageError: bad config or flags, unusable data, unreachable IMAP, unloadable model
    4   another mailtriage-train (the timer's or the daemon's) holds the model directory's lock;
        nothing was done (the units list 4 in SuccessExitStatus= too)
    130 interrupted
    1   an unexpected crash (traceback on stderr)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from mailtriage.core.training import TRUNCATION_CHOICES, TrainParams
from mailtriage.errors import ConfigError, MailtriageError, ModelDirBusyError, ModelError
from mailtriage.cli.logs import configure_logging

log = structlog.get_logger(__name__)

DEFAULT_CONFIG = "/etc/mailtriage/config.toml"
EXIT_PROMOTED = 0
EXIT_ERROR = 2
EXIT_NOT_PROMOTED = 3
EXIT_BUSY = 4  # == mailtriage.model.modeldir.EXIT_BUSY
# Share of the training split set aside for early stopping; the holdout stays untouched until the end.
VALIDATION_FRACTION = 0.1
TRAIN_KEYS_FILE = "train_keys.txt"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if args_list and args_list[0] in _COMMANDS:
        command = args_list.pop(0)
    build, run = _COMMANDS[command]
    args = build().parse_args(args_list)
    configure_logging(args.log_level)
    try:
        _refuse_multi_process(command)
        return run(args)
    except ModelDirBusyError as exc:
        print(f"mailtriage-train {command}: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except MailtriageError as exc:
        print(f"mailtriage-train {command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"mailtriage-train {command}: interrupted", file=sys.stderr)
        return 130


def _refuse_multi_process(command: str) -> None:
    """Training runs data-parallel under torchrun / accelerate launch (``mailtriage_trainer.distributed``);
    eval, list and promote have nothing to share, and several copies would only race: refuse them."""
    from mailtriage_trainer import distributed

    if command != "train" and distributed.world_size() > 1:
        raise ConfigError(
            f"mailtriage-train {command} was started as one of WORLD_SIZE={distributed.world_size()} processes "
            "(torchrun / accelerate launch); only training is shared between processes. Run it directly"
        )


# ---- argument parsing ------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML config (default: $MAILTRIAGE_CONFIG, else {DEFAULT_CONFIG} when it exists); "
                        "flags override it; without one, the flags must say everything")
    p.add_argument("--data", metavar="SOURCE",
                   help="a directory with one sub-folder per category of raw messages, a Maildir, a "
                        "directory of <label>.mbox, an mbox with X-Mailtriage-Label headers, a .tar.gz of "
                        "a folder tree, or .csv/.jsonl with text,label columns")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="default: model.device or auto")
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per message (default: model.max_length)")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="confidence threshold to report coverage for (default: model.threshold or 0.6)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailtriage-train",
        description="Harvest folder-sorted mail, fine-tune a LoRA adapter into a new version under the "
                    "model directory, evaluate it on the newest held-out mail next to a TF-IDF baseline, "
                    "and promote it only if its macro-F1 is not below the current version's on the same "
                    "held-out mail. 'mailtriage-train eval --help' scores a model on a data set.",
        epilog="exit codes: 0 promoted (or --dry-run), 3 trained but not promoted by the gate, "
               "2 error (config, data, IMAP, model), 130 interrupted",
    )
    _common(p)
    p.add_argument("--account", metavar="NAME", help="account to harvest from (default: the first)")
    p.add_argument("--base", metavar="MODEL", help="base model folder or name (default: training.base_model)")
    p.add_argument("--model-dir", metavar="DIR", help="versioned model directory (default: training.model_dir)")
    p.add_argument("--epochs", type=int, metavar="N")
    p.add_argument("--learning-rate", type=float, metavar="LR")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--lora-r", type=int, metavar="R")
    p.add_argument("--patience", type=int, metavar="N", help="stop after N epochs without a better validation score")
    p.add_argument("--seed", type=int)
    p.add_argument("--truncation", choices=TRUNCATION_CHOICES,
                   help="what a message over --max-length tokens keeps (default: training.truncation)")
    p.add_argument("--holdout-fraction", type=float, metavar="F")
    p.add_argument("--min-examples", type=int, metavar="N", help="per class (default: training.min_examples_per_class)")
    p.add_argument("--serve", choices=["auto", "model", "baseline", "ensemble"],
                   help="what the version serves (default: training.serve or auto = best held-out macro-F1)")
    p.add_argument("--refit-all", action=argparse.BooleanOptionalAction, default=None,
                   help="after the gate promoted the version, retrain what it serves on all labelled mail "
                        "(train + holdout) before it goes live (default: training.refit_all)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="fit a softmax temperature on validation mail (default: training.calibrate, on)")
    p.add_argument("--target-accuracy", type=float, metavar="A",
                   help="derive the confidence threshold giving this accuracy on held-out mail, e.g. 0.98, "
                        "and report its coverage (default: training.target_accuracy; 0 = off)")
    p.add_argument("--force", action="store_true", help="promote even when the gate would refuse")
    p.add_argument("--dry-run", action="store_true",
                   help="harvest, dedupe, check and split, print the data summary; train nothing")
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailtriage-train eval",
        description="Score a model version on labelled data; --json prints one JSON object "
                    '{"n", "accuracy", "macro_f1", "per_class", ...} on stdout.',
    )
    _common(p)
    p.add_argument("--model", metavar="PATH", help="MODEL_DIR, MODEL_DIR/current or a version (default: model.path)")
    p.add_argument("--batch-size", type=int, metavar="N", help="inference batch (default: model.batch_size)")
    p.add_argument("--json", action="store_true", help="machine-readable metrics on stdout")
    return p


def build_list_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailtriage-train list",
        description="The model versions in the model directory, oldest first; * marks the one "
                    "`current` points at (the one the daemon serves).",
    )
    p.add_argument("--config", metavar="FILE", help=f"read training.model_dir from it (default {DEFAULT_CONFIG} "
                   "when it exists)")
    p.add_argument("--model-dir", metavar="DIR", help="versioned model directory (default: training.model_dir)")
    p.add_argument("--json", action="store_true", help="one JSON array on stdout")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def build_promote_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailtriage-train promote",
        description="Point `current` at VERSION (roll back to an older model, or forward to one the gate "
                    "kept). The daemon hot-reloads it within its reload interval. No evaluation, no gate.",
    )
    p.add_argument("version", metavar="VERSION", help="a version name from `mailtriage-train list`")
    p.add_argument("--config", metavar="FILE", help=f"read training.model_dir and [categories] from it "
                   f"(default {DEFAULT_CONFIG} when it exists)")
    p.add_argument("--model-dir", metavar="DIR", help="versioned model directory (default: training.model_dir)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


# ---- list and promote ----------------------------------------------------------------------


def _model_dir_of(args: argparse.Namespace) -> tuple[Path, Any]:
    cfg = _load_optional_config(args.config)
    if args.model_dir:
        return Path(args.model_dir), cfg
    if cfg is not None:
        return Path(cfg.training.model_dir), cfg
    raise ConfigError("no model directory: pass --model-dir DIR or --config with training.model_dir")


def _version_row(version_dir: Path, current: Path | None) -> dict[str, Any]:
    from mailtriage.model.manifest import Manifest

    row: dict[str, Any] = {"version": version_dir.name,
                           "current": current is not None and version_dir.resolve() == current}
    try:
        m = Manifest.load(version_dir)
    except ModelError as exc:  # listed anyway: the row says the version cannot be served as it is
        log.warning("manifest_unusable", version=version_dir.name, error=str(exc))
        return {**row, "macro_f1": None, "accuracy": None, "serve": None, "gate": None, "base_model": None}
    return {**row, "macro_f1": m.macro_f1, "accuracy": m.accuracy, "serve": m.serve,
            "gate": m.gate_decision, "base_model": m.base_model}


def cmd_list(args: argparse.Namespace) -> int:
    from mailtriage.model import modeldir

    model_dir, _cfg = _model_dir_of(args)
    try:
        current = modeldir.current_version(model_dir)
    except ModelError as exc:  # a `current` outside the model directory: list the versions to promote one
        print(f"warning: {exc}", file=sys.stderr)
        current = None
    rows = [_version_row(v, current) for v in modeldir.versions(model_dir)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no model versions in {str(model_dir)!r}: train one with mailtriage-train")
        return 0
    print(f"{'':2}{'version':<20} {'macro-F1':>8} {'accuracy':>8}  {'serve':<9} gate")
    for r in rows:
        f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{'*' if r['current'] else ' ':2}{r['version']:<20} {f1:>8} {acc:>8}  {r['serve'] or '-':<9} {r['gate'] or '-'}")
    if current is None:
        print("(none promoted: `mailtriage-train promote VERSION`)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from mailtriage.core.labels import LabelSet
    from mailtriage.model import modeldir

    model_dir, cfg = _model_dir_of(args)
    name = Path(args.version).name
    if name != args.version or name in ("", ".", "..", modeldir.CURRENT):
        raise ConfigError(f"VERSION {args.version!r} must be a version name from `mailtriage-train list`, "
                          "not a path")
    version_dir = model_dir / name
    known = [v.name for v in modeldir.versions(model_dir)]
    if name not in known:
        raise ModelError(f"no complete model version {name!r} in {str(model_dir)!r}; versions there: "
                         f"{known[-10:] or 'none'} (see `mailtriage-train list`)")
    if cfg is not None:  # the daemon would refuse the reload; say so now
        LabelSet.load(version_dir).check_matches(cfg.labels, where=f"version {name!r}")
    with modeldir.exclusive(model_dir):
        try:
            before = modeldir.current_version(model_dir)
            was = before.name if before is not None else "nothing"
        except ModelError:  # a `current` outside the model directory: promoting repairs it
            was = f"a link outside {str(model_dir)!r}"
        modeldir.promote(model_dir, version_dir)
    print(f"current -> {name} (was {was}); the daemon reloads it at its next reload check")
    return 0


# ---- train ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
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

    # Read often: shorthands into params.
    @property
    def seed(self) -> int:
        return self.params.seed

    @property
    def batch_size(self) -> int:
        return self.params.batch_size

    @property
    def max_length(self) -> int:
        return self.params.max_length

    @property
    def device(self) -> str:
        return self.params.device


def _settings(args: argparse.Namespace, cfg: Any) -> _Settings:
    from mailtriage.config import ModelConfig, TrainingConfig

    tc = cfg.training if cfg is not None else TrainingConfig()
    mc = cfg.model if cfg is not None else ModelConfig()

    def pick(flag: Any, default: Any) -> Any:
        return default if flag is None else flag

    model_dir = args.model_dir or (tc.model_dir if cfg is not None else None)
    s = _Settings(
        data=args.data,
        base=args.base or tc.base_model,
        model_dir=Path(model_dir).expanduser() if model_dir else None,
        threshold=pick(args.threshold, mc.threshold),
        holdout_fraction=pick(args.holdout_fraction, tc.holdout_fraction),
        min_examples=pick(args.min_examples, tc.min_examples_per_class),
        params=tc.params(
            seed=args.seed, epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
            lora_r=args.lora_r, max_length=pick(args.max_length, mc.max_length), device=pick(args.device, mc.device),
            patience=args.patience, truncation=getattr(args, "truncation", None),
        ),
        serve=pick(getattr(args, "serve", None), tc.serve),
        refit_all=pick(getattr(args, "refit_all", None), tc.refit_all),
        calibrate=pick(getattr(args, "calibrate", None), tc.calibrate),
        target_accuracy=pick(getattr(args, "target_accuracy", None), tc.target_accuracy),
    )
    if s.target_accuracy and not 0.5 <= s.target_accuracy < 1.0:
        raise ConfigError(f"--target-accuracy {s.target_accuracy!r}: expected 0 (off) or a share between 0.5 and 1, "
                          "e.g. 0.98")
    if not 0.0 <= s.threshold <= 1.0:
        raise ConfigError(f"--threshold {s.threshold!r} is outside 0..1")
    if not 0.0 < s.holdout_fraction < 1.0:
        raise ConfigError(f"--holdout-fraction {s.holdout_fraction!r}: expected a number between 0 and 1 (0.2 is usual)")
    if s.min_examples <= 0:
        raise ConfigError(f"--min-examples {s.min_examples!r}: must be a positive number")
    return s


def cmd_train(args: argparse.Namespace) -> int:
    from mailtriage.model import modeldir
    from mailtriage_trainer import dataset, sources

    cfg = _load_optional_config(args.config)
    s = _settings(args, cfg)
    if not args.dry_run:
        if not s.base:
            raise ConfigError("no base model: pass --base MODEL (a local model folder, or all-MiniLM-L6-v2) "
                              "or set training.base_model in the config")
        if s.model_dir is None:
            raise ConfigError("no model directory: pass --model-dir DIR or --config with training.model_dir")
    progress = sys.stderr.isatty()

    # 1. harvest
    from collections import Counter

    skipped: Counter[str] = Counter()
    if s.data:
        examples = sources.load_source(s.data, categories=cfg.categories if cfg else None, progress=None,
                                       skipped=skipped)
        source_name = str(s.data)
    elif cfg is not None:
        examples = sources.load_imap(cfg, account=args.account, progress=None, skipped=skipped)
        source_name = "imap:" + (args.account or (cfg.accounts[0].name if cfg.accounts else "?"))
    else:
        raise ConfigError("no training data: pass --data SOURCE, or --config with [categories] and "
                          "[[accounts]] to harvest the category folders over IMAP")
    loaded = len(examples)

    # 2. hygiene and split
    examples, dropped = dataset.dedupe(examples)
    labels = list(cfg.labels) if cfg is not None else sources.labels_of(examples)
    dataset.check_min_examples(examples, s.min_examples, labels)
    train_all, holdout = dataset.split(examples, s.holdout_fraction, s.seed)
    train, val = dataset.split(train_all, VALIDATION_FRACTION, s.seed, name="validation")
    data_info: dict[str, Any] = {
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
    if args.dry_run:
        print(json.dumps({"labels": labels, "data": data_info}, indent=2))
        return 0
    assert s.model_dir is not None
    from mailtriage_trainer import distributed

    if distributed.world_size() > 1:
        from mailtriage.model.transformers import pick_device

        distributed.start(pick_device(s.params.device))
        if not distributed.is_main():
            # The other processes only share the fine-tune's batches; rank 0 alone writes the version,
            # scores, gates and promotes it.
            try:
                _finetune(s, train, val, labels, None, progress=False)
            finally:
                distributed.stop()
            return 0

    with modeldir.exclusive(s.model_dir):
        version_dir = modeldir.new_version_dir(s.model_dir)
        log.info("training_started", version=version_dir.name, base_model=s.base, train=len(train),
                 validation=len(val), holdout=len(holdout), labels=len(labels))
        try:
            params, result = _finetune(s, train, val, labels, version_dir, progress)
        except BaseException:
            # An adapter that never finished is no version; leave no half directory behind.
            shutil.rmtree(version_dir, ignore_errors=True)
            raise
        finally:
            distributed.stop()  # the fine-tune is the one part shared with other processes
        manifest = _base_manifest(version_dir, s, labels, data_info, params, result)
        modeldir.write_manifest(version_dir, manifest)  # load_classifier reads base_model from it
        (version_dir / TRAIN_KEYS_FILE).write_text(
            "".join(_key_digest(e.key) + "\n" for e in sorted(train_all, key=lambda e: e.key)), encoding="utf-8")

        # 3. evaluate on the holdout: model, baseline, ensemble (its weight chosen on validation); serve
        # the best of the three unless the config or --serve names one
        from mailtriage.model.ensemble import SERVE_MODEL
        from mailtriage_trainer.evaluate import choose_serve, serve_reason

        scores, probs, baseline = _evaluate_all(s, version_dir, labels, train, val, train_all, holdout, progress)
        parts = (scores["model_metrics"], scores["baseline_metrics"], scores["ensemble_metrics"])
        serve = choose_serve(*parts) if s.serve == "auto" else s.serve
        reason = serve_reason(serve, *parts, scores["ensemble_weight"], configured=s.serve != "auto")
        if serve != SERVE_MODEL:
            baseline.save(version_dir)
        # "metrics" is the version as served (what load_classifier gives), so the gate, eval --model and
        # the next run's gate all score the same thing; each part keeps its own row.
        manifest.update(scores, serve=serve, serve_reason=reason, metrics=scores[f"{serve}_metrics"])
        if s.target_accuracy:
            from mailtriage_trainer.evaluate import threshold_for_accuracy

            manifest["target"] = threshold_for_accuracy([e.label for e in holdout], probs[serve], labels,
                                                        s.target_accuracy)
            log.info("target_threshold", **manifest["target"])
        log.info("serve_chosen", serve=serve, macro_f1=round(manifest["metrics"]["macro_f1"], 4))

        # 4. the gate
        gate = _gate(s, cfg, labels, holdout, probs[serve], manifest["metrics"], args.force, progress)
        manifest["gate"] = gate
        modeldir.write_manifest(version_dir, manifest)
        from mailtriage_trainer.report import write_report

        if gate["promoted"] and s.refit_all:
            manifest["refit"] = _refit_all(s, version_dir, labels, serve, params, result, train_all, holdout,
                                           val, progress)
            modeldir.write_manifest(version_dir, manifest)
        report = write_report(version_dir, manifest)
        if gate["promoted"]:
            modeldir.promote(s.model_dir, version_dir)

    _print_summary(version_dir, manifest, report)
    return EXIT_PROMOTED if gate["promoted"] else EXIT_NOT_PROMOTED


def _finetune(
    s: _Settings, train: Sequence[Any], val: Sequence[Any], labels: Sequence[str], out_dir: Path | None,
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
    version_dir: Path, s: _Settings, labels: Sequence[str], data: dict[str, Any],
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


def _evaluate_all(
    s: _Settings, version_dir: Path, labels: Sequence[str], train: Sequence[Any], val: Sequence[Any],
    train_all: Sequence[Any], holdout: Sequence[Any], progress: bool,
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(manifest entries model_metrics, baseline_metrics, ensemble_metrics, ensemble_weight; holdout
    probabilities of "model", "baseline" and "ensemble"; the baseline fitted on train + validation).

    The ensemble weight is chosen on the validation slice with a baseline fitted on the training
    slice only, so nothing about the holdout leaks into it.
    """
    from mailtriage.model.ensemble import BASELINE_TEMPERATURE, ENSEMBLE_TEMPERATURE, temper
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer.evaluate import (
        DEFAULT_THRESHOLDS, Baseline, ensemble_probs, expected_calibration_error, fit_serving, score_probs, softmax,
    )

    thresholds = (*DEFAULT_THRESHOLDS, s.threshold)
    texts = [e.text for e in holdout]
    y = [e.label for e in holdout]
    # Load the saved adapter the way the daemon will: this also proves the version directory is complete.
    clf = load_classifier(version_dir, device=s.device, batch_size=s.batch_size, max_length=s.max_length,
                          expected_labels=labels)
    # Raw logits (the version has no temperature yet), in the classifier's label order = labels.
    hold_logits = clf.logits(texts).numpy() if texts else np.zeros((0, len(labels)))
    val_logits = clf.logits([e.text for e in val]).numpy()
    del clf
    y_val = [e.label for e in val]
    # Temperatures (model, baseline, ensemble) and the ensemble weight come from validation mail only;
    # the holdout only measures what they did. The baseline's temperature is fitted with a baseline
    # that never saw that mail (TF-IDF + LR is far from calibrated: on BANKING77 10-shot its mean
    # confidence was 0.48 at 74% accuracy, so a 0.6 threshold sent two thirds of the mail to unsure).
    val_baseline = Baseline(labels, seed=s.seed).fit([e.text for e in train], [e.label for e in train])
    fitted = fit_serving(y_val, val_logits, val_baseline.predict_proba([e.text for e in val]), labels, s.calibrate)
    temperature, base_temperature = fitted.temperature, fitted.baseline_temperature
    weight, ens_temperature = fitted.ensemble_weight, fitted.ensemble_temperature
    model_p = softmax(hold_logits, temperature)
    calibration = {
        "temperature": temperature, "fitted_on": len(val),
        "ece_before": expected_calibration_error(y, softmax(hold_logits), labels),
        "ece_after": expected_calibration_error(y, model_p, labels),
    }
    baseline = Baseline(labels, seed=s.seed).fit([e.text for e in train_all], [e.label for e in train_all])
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


def _refit_all(
    s: _Settings, version_dir: Path, labels: Sequence[str], serve: str, params: dict[str, Any],
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
        Baseline(labels, seed=s.seed).fit([e.text for e in everything], [e.label for e in everything]).save(version_dir)
        info["parts"].append("baseline")
    log.info("refit_all_done", **info)
    return info


def _gate(
    s: _Settings, cfg: Any, labels: Sequence[str], holdout: Sequence[Any], served_probs: Any,
    new_metrics: dict[str, Any], force: bool, progress: bool,
) -> dict[str, Any]:
    """Promote only if the new macro-F1 >= the current version's on the same held-out mail.

    Both sides are scored as served: ``served_probs`` / ``new_metrics`` are the new version's served
    output, and the current version goes through load_classifier, which applies its ensemble if any.
    """
    from mailtriage.model import modeldir
    from mailtriage.core.labels import LabelSet

    assert s.model_dir is not None
    current = modeldir.current_version(s.model_dir)
    gate: dict[str, Any] = {"current_version": current.name if current else None, "new_macro_f1": new_metrics["macro_f1"]}

    def decide(promoted: bool, reason: str, decision: str | None = None) -> dict[str, Any]:
        if not promoted and force:
            promoted, decision, reason = True, "forced", reason + " Promoted anyway because of --force."
        gate.update(promoted=promoted, decision=decision or ("promoted" if promoted else "refused"), reason=reason)
        log.info("gate_decided", **{k: v for k, v in gate.items() if k != "current_metrics"})
        return gate

    if current is None:
        return decide(True, "No version was promoted before; this one becomes current.")
    try:
        current_labels = LabelSet.load(current).labels
    except ModelError as exc:
        return decide(True, f"The current version {current.name} cannot be read ({exc}); replacing it.")
    if set(current_labels) != set(labels):
        change = (f"labels {sorted(current_labels)} -> {sorted(labels)}")
        if cfg is not None:
            # The config names the categories the daemon serves; an old label set cannot be served anyway.
            return decide(True, f"The current version {current.name} has another label set ({change}) that no "
                                "longer matches the config; the two are not comparable, so the new one replaces it.")
        return decide(False, f"The current version {current.name} has another label set ({change}); without a "
                             "config saying which set is right, the gate keeps the current one. Pass --force to "
                             "replace it, or --config so the configured categories decide.")

    # Compare on held-out mail the current version never trained on, when it says what it trained on.
    # A current version trained on some of this holdout would score itself too well (a random split
    # moves mail between train and holdout from one run to the next).
    rows = list(range(len(holdout)))
    note = ""
    keys_file = current / TRAIN_KEYS_FILE
    if keys_file.is_file():
        seen = set(keys_file.read_text(encoding="utf-8").split())
        unseen = [i for i in rows if _key_digest(holdout[i].key) not in seen]
        if len(unseen) < len(rows) and {holdout[i].label for i in unseen} == {e.label for e in holdout}:
            rows = unseen
            note = (f" Compared on the {len(rows)} of {len(holdout)} held-out messages that "
                    f"{current.name} did not train on.")
    subset = [holdout[i] for i in rows]
    try:
        current_metrics = _score_version(current, s, labels, subset, progress)
    except ModelError as exc:
        return decide(True, f"The current version {current.name} cannot be loaded ({exc}); replacing it.")
    new_f1 = new_metrics["macro_f1"]
    if len(rows) != len(holdout):
        from mailtriage_trainer.evaluate import score_probs

        new_f1 = score_probs([e.label for e in subset], served_probs[rows], labels, ())["macro_f1"]
    cur_f1 = current_metrics["macro_f1"]
    gate.update(current_macro_f1=cur_f1, new_macro_f1_compared=new_f1, compared_on=len(subset),
                current_metrics=current_metrics)
    # A tiny tolerance so a re-run that reproduces the same model is not refused on float noise.
    if new_f1 >= cur_f1 - 1e-9:
        return decide(True, f"Macro-F1 {new_f1:.4f} >= current version {current.name}'s {cur_f1:.4f} on the "
                            f"same held-out mail.{note}")
    return decide(False, f"Macro-F1 {new_f1:.4f} < current version {current.name}'s {cur_f1:.4f} on the same "
                         f"held-out mail, so {current.name} stays current.{note} This version and its "
                         "report are kept; promote it with --force if that is intended.")


def _score_version(path: Path, s: _Settings, labels: Sequence[str], examples: Sequence[Any], progress: bool) -> dict[str, Any]:
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer.evaluate import DEFAULT_THRESHOLDS, classifier_probs, score_probs

    clf = load_classifier(path, device=s.device, batch_size=s.batch_size, max_length=s.max_length,
                          expected_labels=labels)
    probs = classifier_probs(clf, [e.text for e in examples], labels, batch_size=max(s.batch_size, 32),
                             progress=progress)
    return score_probs([e.label for e in examples], probs, labels, (*DEFAULT_THRESHOLDS, s.threshold))


def _print_summary(version_dir: Path, manifest: dict[str, Any], report: Path) -> None:
    m, b, e = manifest["metrics"], manifest["baseline_metrics"], manifest["ensemble_metrics"]
    gate = manifest["gate"]
    print(f"version {version_dir.name}, serving the {manifest['serve']}: accuracy {m['accuracy']:.1%}, macro-F1 "
          f"{m['macro_f1']:.3f} on {m['n']} held-out messages (model {manifest['model_metrics']['macro_f1']:.3f}, "
          f"baseline {b['macro_f1']:.3f}, ensemble {e['macro_f1']:.3f})")
    target = manifest.get("target")
    if target:
        print(f"target accuracy {target['target_accuracy']:.1%}: " + (
            f"threshold {target['threshold']:.4f} files {target['coverage']:.1%} of held-out mail at "
            f"{target['accuracy_on_covered']:.1%}" if target["reached"] else "not reached at any threshold"))
    if gate["promoted"]:
        print(f"PROMOTED: {gate['reason']}")
    else:
        print(f"NOT PROMOTED: {gate['reason']}")
    print(f"report: {report}")


def _key_digest(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "replace")).hexdigest()[:20]


# ---- eval ----------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer import dataset, sources
    from mailtriage_trainer.evaluate import DEFAULT_THRESHOLDS, brief, evaluate_classifier

    cfg = _load_optional_config(args.config)
    model_path = args.model or (cfg.model.path if cfg is not None else None)
    if not model_path:
        raise ConfigError("no model given: pass --model PATH (a model directory or version) or --config with model.path")
    if not args.data:
        raise ConfigError("no evaluation data: pass --data SOURCE (same formats as training)")
    threshold = args.threshold if args.threshold is not None else (cfg.model.threshold if cfg else 0.6)
    clf = load_classifier(
        model_path,
        device=args.device or (cfg.model.device if cfg else "auto"),
        batch_size=args.batch_size or (cfg.model.batch_size if cfg else 16),
        max_length=args.max_length or (cfg.model.max_length if cfg else 256),
        expected_labels=list(cfg.labels) if cfg is not None else None,
    )
    examples = sources.load_source(args.data, categories=cfg.categories if cfg else None, progress=None)
    examples, _ = dataset.dedupe(examples)
    result = evaluate_classifier(clf, examples, thresholds=(*DEFAULT_THRESHOLDS, threshold))
    if args.json:
        out = brief(result)
        out.update(model=clf.version, confusion=result["confusion"],
                   coverage=next(t for t in result["thresholds"] if t["threshold"] == threshold))
        print(json.dumps(out))
        return 0
    print(f"model {clf.version} on {result['n']} messages from {args.data}")
    print(f"accuracy {result['accuracy']:.1%}   macro-F1 {result['macro_f1']:.3f}")
    width = max(len(label) for label in result["per_class"])
    print(f"{'label':<{width}}  precision  recall     f1  support")
    for label, pc in result["per_class"].items():
        print(f"{label:<{width}}  {pc['precision']:9.3f}  {pc['recall']:6.3f}  {pc['f1']:5.3f}  {pc['support']:7d}")
    for t in result["thresholds"]:
        print(f"threshold {t['threshold']:<4g}: coverage {t['coverage']:6.1%}, accuracy on covered "
              f"{t['accuracy_on_covered']:6.1%}")
    return 0


# ---- shared --------------------------------------------------------------------------------


def _load_optional_config(path: str | None) -> Any:
    """The config when one is named (flag or $MAILTRIAGE_CONFIG) or the default file exists; else None."""
    from mailtriage.config import load_config

    named = path or os.environ.get("MAILTRIAGE_CONFIG")
    if named:
        return load_config(named)
    if Path(DEFAULT_CONFIG).is_file():
        return load_config(DEFAULT_CONFIG)
    return None




_COMMANDS: dict[str, tuple[Any, Any]] = {
    "train": (build_train_parser, cmd_train),
    "eval": (build_eval_parser, cmd_eval),
    "list": (build_list_parser, cmd_list),
    "promote": (build_promote_parser, cmd_promote),
}


if __name__ == "__main__":
    sys.exit(main())

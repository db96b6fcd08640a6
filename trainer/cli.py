"""`mailtriage-train`: the command line of the trainer (argparse, flags -> settings, printing).

The training run itself is pipeline.py (harvest, dedupe, split, fine-tune, evaluate, gate, promote);
the gate's rule is gate.py. Here: `train`, `eval`, `list` and `promote`.

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
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog

from mailtriage.config import DEVICES
from mailtriage.core.training import AUTO_FILED_CHOICES, PRECISION_CHOICES, SERVE_SETTINGS, TRUNCATION_CHOICES
from mailtriage.errors import ConfigError, MailtriageError, ModelDirBusyError, ModelError
from mailtriage.cli.logs import configure_logging
from mailtriage_trainer import pipeline

log = structlog.get_logger(__name__)
from mailtriage_trainer.pipeline import Settings

DEFAULT_CONFIG = "/etc/mailtriage/config.toml"
EXIT_PROMOTED = 0
EXIT_ERROR = 2
EXIT_NOT_PROMOTED = 3
EXIT_BUSY = 4  # == mailtriage.model.modeldir.EXIT_BUSY
LOG_LEVELS = ("debug", "info", "warning", "error")
_Table = TypeVar("_Table")


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
    p.add_argument("--device", choices=DEVICES, help="default: model.device or auto")
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per message (default: model.max_length)")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="confidence threshold to report coverage for (default: model.threshold or 0.6)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)


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
    p.add_argument("--chunks", type=int, metavar="N",
                   help="read a long message in up to N windows of --max-length tokens, scores averaged "
                        "(default: training.chunks = 1)")
    p.add_argument("--precision", choices=PRECISION_CHOICES,
                   help="number format of the training steps: auto = bf16 on a GPU or an AMX CPU, else fp32 "
                        "(default: training.precision)")
    p.add_argument("--holdout-fraction", type=float, metavar="F")
    p.add_argument("--min-examples", type=int, metavar="N", help="per class (default: training.min_examples_per_class)")
    p.add_argument("--serve", choices=SERVE_SETTINGS,
                   help="what the version serves (default: training.serve or auto = best held-out macro-F1)")
    p.add_argument("--refit-all", action=argparse.BooleanOptionalAction, default=None,
                   help="after the gate promoted the version, retrain what it serves on all labelled mail "
                        "(train + holdout) before it goes live (default: training.refit_all)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="fit a softmax temperature on validation mail (default: training.calibrate, on)")
    p.add_argument("--target-accuracy", type=float, metavar="A",
                   help="derive the confidence threshold giving this accuracy on held-out mail, e.g. 0.98, "
                        "and report its coverage (default: training.target_accuracy; 0 = off)")
    p.add_argument("--auto-filed", choices=AUTO_FILED_CHOICES,
                   help="mail the daemon filed into a category folder and nobody moved: train on it, leave it "
                        "out, or train on it once --auto-filed-days old (default: training.auto_filed); "
                        "it is never held out")
    p.add_argument("--auto-filed-days", type=int, metavar="N",
                   help="days staff get to move a wrong filing under after_days (default: training.auto_filed_days)")
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
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
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
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
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
        return {**row, "macro_f1": None, "accuracy": None, "serve": None, "gate": None, "base_model": None,
                "origins": None}
    return {**row, "macro_f1": m.macro_f1, "accuracy": m.accuracy, "serve": m.serve,
            "gate": m.gate_decision, "base_model": m.base_model, "origins": dict(m.origins) or None}


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
    print(f"{'':2}{'version':<20} {'macro-F1':>8} {'accuracy':>8}  {'serve':<9} {'gate':<9} labels: staff/corrected/daemon")
    for r in rows:
        f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{'*' if r['current'] else ' ':2}{r['version']:<20} {f1:>8} {acc:>8}  {r['serve'] or '-':<9} "
              f"{r['gate'] or '-':<9} {_origins_cell(r['origins'])}")
    if current is None:
        print("(none promoted: `mailtriage-train promote VERSION`)")
    return 0


def _origins_cell(origins: dict[str, Any] | None) -> str:
    """"1204/37/148" (daemon filings trained on), "+28 skipped" when auto_filed left some out."""
    if not origins:
        return "-"
    cell = f"{origins.get('staff', 0)}/{origins.get('corrections', 0)}/{origins.get('daemon', 0)}"
    if origins.get("daemon_skipped"):
        cell += f" (+{origins['daemon_skipped']} skipped)"
    return cell + (" (unchecked)" if origins.get("unchecked") else "")


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


def _settings(args: argparse.Namespace, cfg: Any) -> Settings:
    """The run's settings: the flags given, put over the config's [training] and [model] tables (or
    their defaults) and checked by those tables' own rules, so a flag refuses what its key refuses."""
    from mailtriage.config import ModelConfig, TrainingConfig

    tc = _overlay(
        cfg.training if cfg is not None else TrainingConfig(),
        holdout_fraction=args.holdout_fraction, min_examples_per_class=args.min_examples, seed=args.seed,
        epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size, lora_r=args.lora_r,
        truncation=args.truncation, chunks=args.chunks, precision=args.precision, serve=args.serve,
        refit_all=args.refit_all, calibrate=args.calibrate, target_accuracy=args.target_accuracy,
        auto_filed=args.auto_filed, auto_filed_days=args.auto_filed_days,
    )
    # max_length and device are the fine-tune's (TrainParams checks them); the threshold is [model]'s.
    mc = _overlay(cfg.model if cfg is not None else ModelConfig(), threshold=args.threshold)
    model_dir = args.model_dir or (tc.model_dir if cfg is not None else None)
    return Settings(
        data=args.data,
        base=args.base or tc.base_model,
        model_dir=Path(model_dir).expanduser() if model_dir else None,
        threshold=mc.threshold,
        holdout_fraction=tc.holdout_fraction,
        min_examples=tc.min_examples_per_class,
        params=tc.params(max_length=_pick(args.max_length, mc.max_length), device=_pick(args.device, mc.device),
                         patience=args.patience),
        serve=tc.serve,
        refit_all=tc.refit_all,
        calibrate=tc.calibrate,
        target_accuracy=tc.target_accuracy,
        auto_filed=tc.auto_filed,
        auto_filed_days=tc.auto_filed_days,
    )


def _pick(flag: Any, default: Any) -> Any:
    return default if flag is None else flag


def _overlay(table: _Table, **flags: Any) -> _Table:
    """``table`` with the flags that were given in place of its values; its ``__post_init__`` checks them."""
    return dataclasses.replace(table, **{k: v for k, v in flags.items() if v is not None})


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_optional_config(args.config)
    s = _settings(args, cfg)
    if not args.dry_run:
        s.check_can_train()
    data = pipeline.prepare(s, cfg, account=args.account)
    if args.dry_run:
        print(json.dumps({"labels": data.labels, "data": data.info, "origins": data.origins}, indent=2))
        return 0
    outcome = pipeline.run(s, cfg, data, force=args.force, progress=sys.stderr.isatty())
    if outcome is None:  # one of several torchrun processes; rank 0 reports
        return 0
    _print_summary(outcome.version_dir, outcome.manifest, outcome.report)
    return EXIT_PROMOTED if outcome.promoted else EXIT_NOT_PROMOTED


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

"""LoRA fine-tuning of a base model into a mailtriage classifier: one plain, seeded torch loop.

A hand-written loop instead of the HF Trainer keeps every knob visible (class-weighted loss, a
faster-learning head, early stopping on validation macro-F1 and loss, keeping the best epoch) and
memory bounded: texts are tokenized once, truncated, and padded per batch. Batches are grouped by
length (``length_grouped_batches``), so a batch of short mails is not padded to the longest mail of
the set: on real mail about a third of the tokens a random batch computes are padding. Texts arrive
already prepared by ``mailtriage.core.mailtext``.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from peft import LoraConfig, TaskType, get_peft_model
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup, set_seed

from mailtriage.model import modeldir
from mailtriage_trainer import distributed
from mailtriage.errors import TrainingDataError
from mailtriage.core.labels import LabelSet
from mailtriage.core.training import TrainParams  # noqa: F401 - the one parameter type, re-exported
from mailtriage.core.mailtext import MAILTEXT_VERSION
from mailtriage.model.transformers import (
    autocast,
    default_modules_to_save,
    default_target_modules,
    load_base_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    quiet_transformers,
    tokenize_windows,
    training_precision,
    windowed_logits,
)

log = structlog.get_logger(__name__)

# Length grouping sorts this many batches' worth of shuffled examples at a time (Hugging Face's
# LengthGroupedSampler uses 50 too): enough that neighbours in a group have nearly the same length,
# few enough that which examples share a batch still changes from epoch to epoch.
GROUP_BATCHES = 50
# Without a progress bar (under systemd, in a log file) a line at most this often says how far an
# epoch is: an epoch on a large mailbox takes minutes.
PROGRESS_LOG_SECONDS = 60.0


@dataclass
class FinetuneResult:
    best_epoch: int                      # 1-based; the epoch whose adapter was saved
    val_accuracy: float
    val_macro_f1: float
    train_seconds: float
    peak_rss_mb: float                   # peak resident memory of this process so far
    steps: int                           # optimizer steps actually taken
    history: list[dict[str, float]] = field(default_factory=list)   # one row per epoch
    device: str = "cpu"
    stopped_early: bool = False
    precision: str = "fp32"              # what the training steps ran in ("bf16" or "fp32"; params.precision resolved)


def finetune(
    base: str | Path,
    train: Sequence[tuple[str, str]],
    val: Sequence[tuple[str, str]],
    labels: LabelSet,
    out_dir: Path | None,
    params: TrainParams,
    progress: bool = True,
) -> FinetuneResult:
    """Train a LoRA adapter + head on (text, label) pairs and save the best epoch into ``out_dir``.

    ``out_dir`` then holds the adapter (``save_pretrained``), the tokenizer, labels.json and a
    manifest.json with the base model, the parameters and this result; a caller adds to the manifest
    with ``modeldir.read_manifest`` / ``write_manifest``. Inside a torchrun process group of more than
    one process (``mailtriage_trainer.distributed``) every process calls this and shares each batch;
    only rank 0 saves, the others pass ``out_dir=None``.
    """
    _check_data(train, val, labels)
    threads_before = torch.get_num_threads()
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    try:
        return _finetune(base, train, val, labels, Path(out_dir) if out_dir is not None else None, params,
                         progress, distributed.active())
    finally:
        torch.set_num_threads(threads_before)


def _finetune(
    base: str | Path,
    train: Sequence[tuple[str, str]],
    val: Sequence[tuple[str, str]],
    labels: LabelSet,
    out_dir: Path | None,
    params: TrainParams,
    progress: bool,
    parallel: bool,
) -> FinetuneResult:
    """Set up, run the epochs, save the best: the three steps below."""
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run = _setup(base, train, val, labels, params, parallel)
    loop = _epochs(run, params, progress)
    result = FinetuneResult(
        best_epoch=loop.best_epoch,
        val_accuracy=loop.history[loop.best_epoch - 1]["val_accuracy"],
        val_macro_f1=loop.history[loop.best_epoch - 1]["val_macro_f1"],
        train_seconds=time.monotonic() - started,
        peak_rss_mb=_peak_rss_mb(),
        steps=loop.steps,
        history=loop.history,
        device=run.device,
        stopped_early=loop.stopped_early,
        precision=run.precision,
    )
    if out_dir is not None:
        _save(run, loop.best_state, labels, out_dir)
        _write_training_manifest(out_dir, base, params, result, len(train), len(val))
    log.info(
        "finetune_done",
        out_dir=str(out_dir),
        best_epoch=result.best_epoch,
        val_accuracy=round(result.val_accuracy, 4),
        val_macro_f1=round(result.val_macro_f1, 4),
        seconds=round(result.train_seconds, 1),
        peak_rss_mb=round(result.peak_rss_mb),
    )
    return result


@dataclass
class _Run:
    """Everything one fine-tuning run trains with: built by ``_setup``, used by ``_epochs`` and ``_save``."""

    device: str
    precision: str                       # of the training steps: "bf16" or "fp32"
    tokenizer: Any
    model: Any                           # the peft model (base + LoRA + trainable head)
    trainable: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: torch.nn.Module
    train_ids: list[list[list[int]]]     # per example its windows (one unless params.chunks > 1)
    train_y: torch.Tensor
    val_ids: list[list[list[int]]]       # shortest first: validation batches then need little padding
    val_y: torch.Tensor
    batches_per_epoch: int
    total_steps: int
    parallel: bool = False               # batches shared with the other torchrun processes


@dataclass
class _Loop:
    """What the epoch loop found: the history, and the best epoch's trainable tensors."""

    history: list[dict[str, float]]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    steps: int
    stopped_early: bool


def _setup(
    base: str | Path,
    train: Sequence[tuple[str, str]],
    val: Sequence[tuple[str, str]],
    labels: LabelSet,
    params: TrainParams,
    parallel: bool = False,
) -> _Run:
    """Seed, load the base with LoRA and a fresh head, tokenize, build optimizer and schedule."""
    set_seed(params.seed)  # python, numpy and torch: the head and LoRA init and the batch order repeat

    device = pick_device(params.device)
    precision = training_precision(device, params.precision)
    tokenizer = load_tokenizer(base)
    # bf16 base weights on CUDA (half the memory); on a CPU the weights stay fp32 and autocast runs
    # the matrix products in bf16, which AMX computes faster without a bf16 copy of the model.
    model = load_base_model(base, labels, tokenizer, pick_dtype(device) if precision == "bf16" else torch.float32)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # makes peft train and save the classification head (modules_to_save)
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=list(params.target_modules or default_target_modules(model)),
        # a copy: peft appends the head's name to the list it is given
        modules_to_save=list(params.modules_to_save if params.modules_to_save is not None
                             else default_modules_to_save(model)) or None,
    )
    with quiet_transformers():
        model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights in fp32 even on a bf16 base (autocast mixes them)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if parallel:
        distributed.sync_parameters(trainable)

    label2id = labels.label2id
    # With chunks > 1 a long text is several windows, logits averaged before the loss, as served.
    train_ids = tokenize_windows(tokenizer, [t for t, _ in train], params.max_length, params.truncation, params.chunks)
    train_y = torch.tensor([label2id[y] for _, y in train])
    val_ids = tokenize_windows(tokenizer, [t for t, _ in val], params.max_length, params.truncation, params.chunks)
    val_y = torch.tensor([label2id[y] for _, y in val])
    # The scores are over the whole set, so its order is free: sorted, each batch pads to little.
    by_length = sorted(range(len(val_ids)), key=lambda i: _tokens(val_ids[i]))
    val_ids, val_y = [val_ids[i] for i in by_length], val_y[by_length]

    weight = _class_weights(train_y, len(labels.labels)) if params.class_weighting else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)
    # The head starts from random weights and has to move much further than the LoRA matrices;
    # its own (higher) rate gets it to confident, separated scores within a few epochs.
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    groups = [
        {"params": adapter, "lr": params.learning_rate},
        {"params": head, "lr": params.learning_rate * params.head_lr_scale},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=params.weight_decay)
    batches_per_epoch = math.ceil(len(train_ids) / params.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / params.grad_accum)
    total_steps = steps_per_epoch * params.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(params.warmup * total_steps), total_steps)

    log.info(
        "finetune_start",
        base_model=str(base),
        device=device,
        precision=precision,
        train=len(train),
        val=len(val),
        labels=len(labels.labels),
        trainable_params=sum(p.numel() for p in trainable),
        optimizer_steps=total_steps,
        processes=distributed.world_size() if parallel else 1,
        train_tokens=sum(map(_tokens, train_ids)),
        train_windows=sum(map(len, train_ids)),
    )
    return _Run(device, precision, tokenizer, model, trainable, optimizer, scheduler, loss_fn, train_ids, train_y,
                val_ids, val_y, batches_per_epoch, total_steps, parallel)


def _epochs(run: _Run, params: TrainParams, progress: bool) -> _Loop:
    """Train epoch by epoch, validate after each, keep the best, stop after ``patience`` stale epochs."""
    model, device = run.model, run.device
    show_bar = _show_bar(progress)
    bar = tqdm(
        total=run.total_steps,
        unit="step",
        desc="fine-tuning",
        # under systemd the log lines below take its place; under torchrun rank 0 draws the one bar
        disable=not show_bar,
    )
    history: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    max_f1 = 0.0
    f1_tolerance = 0.01 + 1 / len(run.val_ids)  # F1 differences below about one validation example are noise
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, stale, steps = 0, 0, 0
    generator = torch.Generator().manual_seed(params.seed)
    lengths = [_tokens(windows) for windows in run.train_ids]
    stopped_early = False
    started = last_report = time.monotonic()
    try:
        for epoch in range(1, params.epochs + 1):
            epoch_started = time.monotonic()
            log.info("finetune_epoch_start", epoch=epoch, epochs=params.epochs, steps_done=steps,
                     steps=run.total_steps, elapsed_s=round(epoch_started - started, 1),
                     eta_s=_eta(epoch_started - started, epoch - 1, params.epochs))
            model.train()
            running, seen = 0.0, 0
            for b, chunk in enumerate(length_grouped_batches(lengths, params.batch_size, generator)):
                # Under torchrun this process takes its share of the batch, weighted by its size.
                mine, share = distributed.my_share(chunk) if run.parallel else (chunk, 1.0)
                with autocast(device, run.precision):
                    logits = windowed_logits(model, run.tokenizer, [run.train_ids[i] for i in mine], device)
                loss = run.loss_fn(logits.float(), run.train_y[mine].to(device))
                (loss * share / params.grad_accum).backward()
                if share:
                    running += loss.item() * len(mine)
                    seen += len(mine)
                if (b + 1) % params.grad_accum == 0 or b + 1 == run.batches_per_epoch:
                    if run.parallel:
                        distributed.sum_gradients(run.trainable)
                    torch.nn.utils.clip_grad_norm_(run.trainable, params.max_grad_norm)
                    run.optimizer.step()
                    run.scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
                    steps += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{running / max(seen, 1):.3f}")
                    now = time.monotonic()
                    if not show_bar and now - last_report >= PROGRESS_LOG_SECONDS:
                        last_report = now
                        log.info("finetune_progress", epoch=epoch, steps_done=steps, steps=run.total_steps,
                                 train_loss=round(running / max(seen, 1), 4), elapsed_s=round(now - started, 1),
                                 eta_s=_eta(now - started, steps, run.total_steps))

            # At the training batch size: 4x as large saved little on a pass that is a few percent of
            # the epoch, and peak RSS was 170 MiB higher (2,000 real-length mails, MiniLM, CPU).
            val_loss, val_acc, val_f1 = _evaluate(model, run.tokenizer, run.val_ids, run.val_y, params.batch_size, device,
                                                  _serving_precision(run))
            row = {
                "epoch": float(epoch),
                "train_loss": running / max(seen, 1),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "val_macro_f1": val_f1,
                "seconds": time.monotonic() - epoch_started,
            }
            history.append(row)
            max_f1 = max(max_f1, val_f1)
            improved = best is None or _better(row, best, max_f1, f1_tolerance)
            elapsed = time.monotonic() - started
            # The ETA assumes every remaining epoch runs; early stopping can only make it shorter.
            log.info("finetune_epoch", **{k: round(v, 4) for k, v in row.items()}, best=improved,
                     epochs=params.epochs, elapsed_s=round(elapsed, 1), eta_s=_eta(elapsed, epoch, params.epochs))
            if improved:
                best, best_epoch, stale = row, epoch, 0
                # Only the trainable tensors (LoRA + head): a few MB even for a large base.
                best_state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
            else:
                stale += 1
            stop = stale >= params.patience
            if run.parallel:
                stop = distributed.rank0_decides(stop)
            if stop:
                stopped_early = epoch < params.epochs
                if stopped_early:
                    log.info("finetune_stopped_early", epoch=epoch, best_epoch=best_epoch, patience=params.patience)
                break
    finally:
        bar.close()
    return _Loop(history, best_epoch, best_state, steps, stopped_early)


def _tokens(windows: Sequence[list[int]]) -> int:
    """An example's length for batching: the tokens of all its windows."""
    return sum(map(len, windows))


def _show_bar(progress: bool) -> bool:
    """A progress bar only for a person watching: on a terminal, and under torchrun on rank 0 only
    (the others would draw over it). Elsewhere (systemd's journal, a log file) the log lines say it."""
    return progress and sys.stderr.isatty() and distributed.is_main()


def _eta(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left at the pace so far; None before there is a pace."""
    return round(elapsed / done * (total - done), 1) if done else None


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches of example indices: every index exactly once, in ``ceil(n / batch_size)``
    batches, examples of about the same length together (so padding per batch is small), and an
    order that depends only on ``generator``'s state (seeded runs repeat; torchrun processes agree).

    Shuffle, sort each run of ``GROUP_BATCHES`` batches by length, cut it into batches, shuffle the
    batches: which examples meet in a batch and the order of lengths still change every epoch.
    Only the group's last batch can be short, and only the last group has one.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        # A stable sort: equal lengths (common: every mail cut at max_length) keep their shuffled order.
        members = sorted(order[start : start + group], key=lengths.__getitem__)
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def _save(run: _Run, best_state: dict[str, torch.Tensor], labels: LabelSet, out_dir: Path) -> None:
    """Put the best epoch's tensors back and save adapter + head, tokenizer and labels."""
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if name in best_state:
                p.copy_(best_state[name])
    run.model.save_pretrained(str(out_dir))
    run.tokenizer.save_pretrained(str(out_dir))
    labels.save(out_dir)


def _check_data(train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]], labels: LabelSet) -> None:
    if not train:
        raise TrainingDataError("no training examples; the training source yielded nothing to learn from")
    if not val:
        raise TrainingDataError(
            "no validation examples; finetune() keeps the best epoch by validation score, so pass a "
            "non-empty held-out split (a few examples per category)"
        )
    known = set(labels.labels)
    for name, rows in (("training", train), ("validation", val)):
        unknown = sorted({y for _, y in rows} - known)
        if unknown:
            raise TrainingDataError(
                f"{name} examples carry labels {unknown} that are not in the label set {list(labels.labels)}; "
                "add them to [categories] or drop those examples"
            )


def _better(row: dict[str, float], best: dict[str, float], max_f1: float, tolerance: float) -> bool:
    """Is this epoch better than the best so far? Clearly higher macro-F1 wins; among epochs whose
    F1 is within ``tolerance`` of the highest seen, lower validation loss wins: on small validation
    sets F1 moves in steps of one example, while the loss also rewards confident, separated scores,
    which routing needs (low confidence sends mail to the unsure folder)."""
    if row["val_macro_f1"] > best["val_macro_f1"] + tolerance:
        return True
    return row["val_macro_f1"] >= max_f1 - tolerance and row["val_loss"] < best["val_loss"]


def _class_weights(y: torch.Tensor, n_labels: int) -> torch.Tensor:
    """``n / (k * count)`` per class, like scikit-learn's "balanced"; absent classes get 1 (never a target)."""
    counts = torch.bincount(y, minlength=n_labels).float()
    present = counts > 0
    weights = torch.ones(n_labels)
    weights[present] = len(y) / (int(present.sum()) * counts[present])
    return weights


def _serving_precision(run: _Run) -> str:
    """Validation scores the numbers serving will compute: fp32 on a CPU (the daemon serves fp32
    there, so epochs are chosen on its scores), the training precision on a GPU."""
    return "fp32" if run.device == "cpu" else run.precision


def _evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    ids: list[list[list[int]]],
    y: torch.Tensor,
    batch_size: int,
    device: str,
    precision: str,
) -> tuple[float, float, float]:
    """Unweighted validation loss, accuracy and macro-F1."""
    model.eval()
    preds: list[int] = []
    total_loss = 0.0
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(ids), batch_size):
            logits = windowed_logits(model, tokenizer, ids[start : start + batch_size], device).float().cpu()
            target = y[start : start + batch_size]
            total_loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            preds.extend(logits.argmax(-1).tolist())
    truth = y.tolist()
    accuracy = sum(p == t for p, t in zip(preds, truth, strict=True)) / len(truth)
    return total_loss / len(truth), accuracy, macro_f1(truth, preds)


def macro_f1(truth: Sequence[int | str], preds: Sequence[int | str]) -> float:
    """Mean F1 over the classes seen in truth or predictions (scikit-learn's ``average="macro"``)."""
    tp: Counter[int | str] = Counter()
    fp: Counter[int | str] = Counter()
    fn: Counter[int | str] = Counter()
    for t, p in zip(truth, preds, strict=True):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    classes = set(truth) | set(preds)
    if not classes:
        return 0.0
    return sum(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in classes) / len(classes)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _write_training_manifest(
    out_dir: Path, base: str | Path, params: TrainParams, result: FinetuneResult, n_train: int, n_val: int
) -> None:
    """Record what the adapter needs to be loaded again, merged into any manifest already there."""
    manifest: dict[str, Any] = {}
    if (out_dir / modeldir.MANIFEST_FILE).is_file():
        manifest = modeldir.read_manifest(out_dir)
    manifest["base_model"] = modeldir.base_model_name(base)
    manifest.setdefault("mailtext_version", MAILTEXT_VERSION)
    manifest["training"] = {
        "params": asdict(params),
        "n_train": n_train,
        "n_val": n_val,
        "result": asdict(result),
    }
    modeldir.write_manifest(out_dir, manifest)

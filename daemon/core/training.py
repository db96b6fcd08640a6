"""The fine-tune's parameters: one type with one validator.

``[training]`` in the config (``TrainingConfig.params``), the trainer's flags (``mailtriage-train``)
and the benchmarks all build a ``TrainParams``; ``mailtriage_trainer.finetune`` trains with it and
records it in the adapter's manifest. Pure: no torch here, so the daemon's config can validate it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailtriage.errors import ConfigError


# What a text longer than max_length keeps (mailtriage.model.transformers.tokenize cuts it).
TRUNCATION_CHOICES = ("head", "head_tail")
# The number format of the training steps: "auto" is bf16 where the hardware computes it fast (a
# CUDA GPU, or a CPU with AMX matrix units) and fp32 elsewhere; the saved weights are fp32 either way.
PRECISION_CHOICES = ("auto", "fp32", "bf16")

# [training] chunks: a text is read in up to this many windows of max_length tokens, their logits
# averaged (mailtriage.model.transformers.tokenize_windows). Each window costs one more forward pass.
CHUNKS_MAX = 8

# What a version serves (its manifest's "serve"; mailtriage.model.ensemble serves each), and what
# [training] serve / --serve accept: one of those, or "auto" = the best of them on held-out mail.
SERVE_MODEL = "model"
SERVE_BASELINE = "baseline"
SERVE_ENSEMBLE = "ensemble"
SERVE_CHOICES = (SERVE_MODEL, SERVE_BASELINE, SERVE_ENSEMBLE)
SERVE_AUTO = "auto"
SERVE_SETTINGS = (SERVE_AUTO, *SERVE_CHOICES)

# What a retrain does with mail the daemon filed into a category folder and nobody moved
# ([training] auto_filed, --auto-filed; mailtriage_trainer.origins applies it): its label is the
# daemon's own guess, not a staff decision. "after_days" keeps the filings at least
# auto_filed_days old (staff had time to move them); the default was chosen by
# benchmarks/auto_filed.py (benchmarks/RESULTS.md, "Learning from its own filings").
AUTO_FILED_INCLUDE = "include"
AUTO_FILED_EXCLUDE = "exclude"
AUTO_FILED_AFTER_DAYS = "after_days"
AUTO_FILED_CHOICES = (AUTO_FILED_INCLUDE, AUTO_FILED_EXCLUDE, AUTO_FILED_AFTER_DAYS)
AUTO_FILED_DEFAULT = AUTO_FILED_EXCLUDE
AUTO_FILED_DAYS_DEFAULT = 7


@dataclass
class TrainParams:
    epochs: int = 8
    learning_rate: float = 1e-3          # LoRA wants a higher rate than full fine-tuning
    batch_size: int = 16
    grad_accum: int = 1                  # optimizer step every N batches: a larger effective batch in bounded memory
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    max_length: int = 256
    seed: int = 13
    patience: int = 2                    # stop after this many epochs without a better validation score
    weight_decay: float = 0.01
    warmup: float = 0.06                 # fraction of optimizer steps with a linearly rising rate
    class_weighting: bool = True         # inverse-frequency class weights: rare categories still count
    target_modules: list[str] | None = None   # None: the query/value projections of the model's family
    modules_to_save: list[str] | None = None  # fully trained besides the head; None: the family's default (BERT: pooler)
    max_grad_norm: float = 1.0
    head_lr_scale: float = 10.0          # the fully trained modules (head) learn at learning_rate x this
    device: str = "auto"
    num_threads: int | None = None       # CPU threads for torch while training; None keeps torch's default
    truncation: str = "head"             # a text over max_length keeps its "head", or "head_tail" (first quarter + end)
    chunks: int = 1                      # read a long text in up to N windows of max_length, logits averaged
    precision: str = "auto"              # training steps in bf16 where fast (GPU, AMX CPU), else fp32: PRECISION_CHOICES

    def __post_init__(self) -> None:
        # The one validator: the [training] table, the trainer's flags and the benchmarks all get here.
        for name in ("epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"training parameter {name} = {value!r}: must be a whole number >= 1 "
                                  f"([training] {name} in the config, or --{name.replace('_', '-')})")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"training parameter learning_rate = {self.learning_rate!r}: allowed 0 < lr < 1 "
                              "(1e-3 suits LoRA, 5e-5 a full fine-tune; [training] learning_rate in the config, "
                              "or --learning-rate)")
        if self.head_lr_scale <= 0:
            raise ConfigError(f"training parameter head_lr_scale = {self.head_lr_scale!r}: must be > 0 (10 is a sound start)")
        for name in ("lora_dropout", "warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"training parameter {name} = {getattr(self, name)!r}: allowed 0 <= x < 1")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ConfigError(f"training parameters weight_decay = {self.weight_decay!r} (>= 0) and "
                              f"max_grad_norm = {self.max_grad_norm!r} (> 0) are out of range")
        if self.truncation not in TRUNCATION_CHOICES:
            raise ConfigError(f"training parameter truncation = {self.truncation!r}: expected \"head\" (the "
                              "first max_length tokens) or \"head_tail\" (the first quarter and the end)")
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or not 1 <= self.chunks <= CHUNKS_MAX:
            raise ConfigError(f"training parameter chunks = {self.chunks!r}: expected a whole number 1..{CHUNKS_MAX} "
                              "(1 reads the first max_length tokens as before; N reads up to N windows of "
                              "max_length tokens and averages their scores; [training] chunks, or --chunks)")
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"training parameter precision = {self.precision!r}: expected \"auto\" (bf16 on a GPU "
                              "or a CPU with AMX, else fp32), \"fp32\" or \"bf16\" ([training] precision in the "
                              "config, or --precision)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"training parameter num_threads = {self.num_threads!r}: must be >= 1 (or unset)")

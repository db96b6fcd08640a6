"""The Classifier implementation on transformers + peft: where the daemon loads every local model version.

A model version is a base model (named in manifest.json) plus a LoRA adapter whose saved
``modules_to_save`` carry the trained classification head, so the head has exactly the labels in
labels.json and nothing else. When the trainer found that averaging with its TF-IDF baseline scores
higher on held-out mail, the manifest says ``"serve": "ensemble"`` and ``baseline.npz`` is loaded
too. The trainer reuses the loading helpers here, so training and serving build the model the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from mailtriage.config import QUANTIZE_CHOICES, RUNTIME_CHOICES
from mailtriage.model import ensemble

from mailtriage.model import modeldir
from mailtriage.model.manifest import Manifest
from mailtriage.core import explain
from mailtriage.core.classifier import Prediction
from mailtriage.errors import ModelError
from mailtriage.core.labels import LabelSet
from mailtriage.core.training import CHUNKS_MAX, TRUNCATION_CHOICES

if TYPE_CHECKING:  # transformers' modeling half costs ~90 MiB of RSS (torch._dynamo, sympy, accelerate);
    # a daemon serving a saved ONNX graph needs only the tokenizer, so it is imported where a model is built.
    from transformers import PreTrainedModel

log = structlog.get_logger(__name__)

# Module-name suffixes of the attention projections LoRA adapts, per model family; the first family
# whose names occur in the model wins. Query and value are the classic LoRA choice and enough here.
_LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),     # Qwen2, Llama, Mistral, Gemma, Phi-3 ...
    ("query", "value"),       # BERT, RoBERTa, MiniLM, XLM-R, ELECTRA
    ("q_lin", "v_lin"),       # DistilBERT
    ("q", "v"),               # MPNet (all-mpnet-base-v2): attention.attn.q / .k / .v / .o
)


def pick_device(pref: str = "auto") -> str:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice that is not available is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if pref == "auto":
        return next(name for name in ("cuda", "mps", "cpu") if available[name])
    if pref not in available:
        raise ModelError(f"device {pref!r} is unknown; use one of auto, cuda, mps, cpu")
    if not available[pref]:
        raise ModelError(f"device {pref!r} was asked for but torch sees none here; use device = \"auto\" or \"cpu\"")
    return pref


def choose_runtime(runtime: str, quantize: str, device: str, manifest: Manifest) -> tuple[str, str]:
    """Resolve "auto" in ``runtime`` / ``quantize`` for ``device``; explicit values are kept as given.

    Off a CPU, "auto" is torch without quantization (bf16 on CUDA). On a CPU the version decides
    (``Manifest.cpu_serving``): onnxruntime int8 where the trainer measured that int8 kept the holdout
    accuracy, else torch fp32. "auto" next to an explicit value follows it: runtime "auto" with
    quantize "int8" is onnxruntime where the version vouches for it and torch int8 otherwise; quantize
    "auto" with an explicit runtime is int8 only on onnxruntime and only where the version vouches.
    """
    if device != "cpu":
        return ("torch" if runtime == "auto" else runtime, "none" if quantize == "auto" else quantize)
    vouched = manifest.cpu_serving == ("onnxruntime", "int8")
    if runtime == "auto":
        runtime = "onnxruntime" if vouched and quantize in ("auto", "int8") else "torch"
    if quantize == "auto":
        quantize = "int8" if vouched and runtime == "onnxruntime" else "none"
    return runtime, quantize


def pick_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA (half the memory, fast tensor cores); fp32 elsewhere: on CPUs without AMX bf16 is
    slower than fp32, and bf16 support on MPS depends on the macOS version."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 matrix units (Intel Sapphire Rapids and later), where oneDNN runs
    bf16 matrix products several times faster than fp32; on other CPUs bf16 is slower than fp32."""
    try:
        return bool(torch.cpu.get_capabilities().get("amx_bf16"))
    except (AttributeError, RuntimeError):  # an older torch without the query: assume no AMX
        return False


def training_precision(device: str, precision: str) -> str:
    """"bf16" or "fp32" for a training run on ``device`` (``precision`` from TrainParams: auto/fp32/bf16)."""
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" or (device == "cpu" and cpu_has_amx_bf16()) else "fp32"


def autocast(device: str, precision: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast, so fp32 trainable weights (LoRA, head) mix with bf16 matrix products: always on
    CUDA unless ``precision`` is "fp32"; on a CPU only when ``precision`` is "bf16" (training on AMX;
    serving on a CPU stays fp32, like the holdout it was checked on). A no-op elsewhere."""
    if device == "cuda" and precision != "fp32":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if device == "cpu" and precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report ("classifier.weight MISSING": expected, the adapter brings the
    head), its weight-loading progress bars and peft's use of a deprecated transformers name, which
    would only clutter the daemon's log."""
    verbosity = hf_logging.get_verbosity()
    bars_were_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad.

    A tokenizer built with the ``tokenizers`` library (saved as plain ``PreTrainedTokenizerFast`` /
    ``TokenizersBackend``) is loaded with that class: ``AutoTokenizer`` next to a Qwen2 config.json
    would silently swap in Qwen's own normalizer. Decoders often have no pad token: use EOS (the
    model reads the last non-pad token, and pad_token_id goes into the model config).
    """
    location = modeldir.resolve_base_model(path)
    tokenizer_class = None
    config_file = Path(location, "tokenizer_config.json")
    if config_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            tokenizer_class = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
    try:
        with quiet_transformers():
            if tokenizer_class in ("PreTrainedTokenizerFast", "TokenizersBackend"):
                tokenizer = PreTrainedTokenizerFast.from_pretrained(location)
            else:
                tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ModelError(f"no usable tokenizer at {str(path)!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the tokenizer at {str(path)!r} has neither a pad nor an eos token, so batches cannot be "
                "padded; add a pad token to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    base: str | Path, labels: LabelSet, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> PreTrainedModel:
    """The base model with a fresh classification head of exactly ``labels``, ready for a LoRA adapter."""
    location = modeldir.resolve_base_model(base)
    try:
        with quiet_transformers():
            from transformers import AutoModelForSequenceClassification

            return AutoModelForSequenceClassification.from_pretrained(
                location,
                num_labels=len(labels.labels),
                id2label=labels.id2label,
                label2id=labels.label2id,
                pad_token_id=tokenizer.pad_token_id,  # without it, batches larger than 1 fail on decoders
                dtype=dtype,
            )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"base model {str(base)!r} could not be loaded from {location!r}: {exc}. Nothing is downloaded "
            "at run time: install or copy the base model to that path, or retrain on a base that is here."
        ) from exc


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The LoRA targets for this model's family (query/value projections)."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for family in _LORA_TARGETS:
        if set(family) <= leaf_names:
            return list(family)
    raise ModelError(
        f"cannot tell which attention layers to adapt in a {type(model).__name__}; pass target_modules "
        f"explicitly (known families: {[list(f) for f in _LORA_TARGETS]})"
    )


def default_modules_to_save(model: torch.nn.Module) -> list[str]:
    """Modules trained in full next to the head (peft adds the head itself).

    A BERT-style classifier reads the [CLS] vector through its ``pooler``; sentence encoders such as
    all-MiniLM-L6-v2 were trained with mean pooling, so that pooler never learned to summarise a
    text. Training it too lifted held-out accuracy on the demo mailbox from 83% to 92%.
    """
    return ["pooler"] if any(name.rsplit(".", 1)[-1] == "pooler" for name, _ in model.named_modules()) else []


# head_tail keeps this share of the token budget from the start and the rest from the end: Sun et al.
# 2019 ("How to Fine-Tune BERT for Text Classification?") found head 128 + tail 382 of 512 tokens
# best on long documents (IMDb, Sogou), better than the head alone.
HEAD_TAIL_HEAD_SHARE = 0.25


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, truncation: str = "head"
) -> list[list[int]]:
    """Token ids per text, at most ``max_length``; padding happens per batch (dynamic padding).

    ``truncation`` says what a longer text keeps: ``head`` its first tokens, ``head_tail`` its first
    quarter and its last three quarters of the budget (the end of a mail often says what it wants).
    Training and serving both tokenize here, with the value recorded in the version's manifest.
    """
    if truncation not in TRUNCATION_CHOICES:
        raise ModelError(f"truncation = {truncation!r} is unknown; use one of {', '.join(TRUNCATION_CHOICES)}")
    if truncation == "head":
        rows = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    else:
        prefix, suffix = _frame(tokenizer)
        budget = max(max_length - prefix - suffix, 1)
        rows = [ids if len(ids) <= max_length else
                ids[:prefix] + head_tail(ids[prefix:len(ids) - suffix], budget) + ids[len(ids) - suffix:]
                for ids in _untruncated(tokenizer, texts)]
    filler = _filler(tokenizer)
    return [list(ids) or filler for ids in rows]


def tokenize_windows(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, truncation: str = "head",
    chunks: int = 1,
) -> list[list[list[int]]]:
    """Per text, the token-id windows the model reads: ``tokenize``'s one row when ``chunks`` is 1.

    With ``chunks`` N > 1 a text over ``max_length`` tokens is read in up to N windows, each framed
    by the special tokens like a text of its own and at most ``max_length`` long; the caller averages
    the windows' logits (``pool_logits``). A text longer than N windows first loses what
    ``truncation`` drops, with N windows' worth of budget. The windows are of equal size (within one
    token), not full windows and a stub: a 20-token stub would get as much say in the average as a
    window of 254. Training and serving both cut here, with the values recorded in the manifest.
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= CHUNKS_MAX:
        raise ModelError(f"chunks = {chunks!r} is out of range; use a whole number 1..{CHUNKS_MAX}")
    if chunks == 1:
        return [[ids] for ids in tokenize(tokenizer, texts, max_length, truncation)]
    if truncation not in TRUNCATION_CHOICES:
        raise ModelError(f"truncation = {truncation!r} is unknown; use one of {', '.join(TRUNCATION_CHOICES)}")
    prefix, suffix = _frame(tokenizer)
    budget = max(max_length - prefix - suffix, 1)
    filler = _filler(tokenizer)
    out: list[list[list[int]]] = []
    for ids in _untruncated(tokenizer, texts):
        if len(ids) <= max_length:
            out.append([ids or filler])
            continue
        head, body, tail = ids[:prefix], ids[prefix:len(ids) - suffix], ids[len(ids) - suffix:]
        cap = chunks * budget
        body = body[:cap] if truncation == "head" else head_tail(body, cap)
        n = -(-len(body) // budget)  # ceil
        cuts = [round(len(body) * i / n) for i in range(n + 1)]
        out.append([head + body[cuts[i]:cuts[i + 1]] + tail for i in range(n)])
    return out


def pool_logits(logits: torch.Tensor, owner: torch.Tensor, n_texts: int) -> torch.Tensor:
    """Mean of the window logits of each text (``owner[i]``: the text window ``i`` belongs to);
    differentiable, so training pools before the loss exactly as serving pools before the softmax."""
    sums = torch.zeros((n_texts, logits.shape[-1]), dtype=logits.dtype, device=logits.device).index_add_(0, owner, logits)
    counts = torch.bincount(owner, minlength=n_texts).clamp_min(1).to(logits.dtype)
    return sums / counts[:, None]


def windowed_logits(model: Any, tokenizer: PreTrainedTokenizerBase, windows: Sequence[Sequence[list[int]]],
                    device: str) -> torch.Tensor:
    """One forward pass over all windows of these texts, pooled per text (n_texts x n_labels, on ``device``)."""
    rows = [w for text in windows for w in text]
    logits = model(**collate(tokenizer, rows, device)).logits
    if len(rows) == len(windows):  # one window each (chunks = 1, or only short texts): nothing to pool
        return logits
    owner = torch.tensor([i for i, text in enumerate(windows) for _ in text], device=device)
    return pool_logits(logits, owner, len(windows))


def _frame(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text ([CLS] ... [SEP] on BERT,
    <s> ... </s> on MPNet, none on Qwen): they stay on every row or window; the text between is cut."""
    probe = tokenizer(["x"], add_special_tokens=False)["input_ids"][0]
    framed = list(tokenizer(["x"])["input_ids"][0])
    prefix = next(i for i in range(len(framed)) if framed[i:i + len(probe)] == list(probe))
    return prefix, len(framed) - prefix - len(probe)


def _untruncated(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    with quiet_transformers():  # "sequence longer than the model's maximum": the callers cut it
        return [list(ids) for ids in tokenizer(list(texts), truncation=False, padding=False)["input_ids"]]


def _filler(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Decoder tokenizers add no special tokens, so an empty text would be an empty row, which the
    model cannot take; one EOS (or pad) token gives it a defined, if uninformative, input."""
    return [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id]


def head_tail(ids: list[int], budget: int) -> list[int]:
    """``ids`` if they fit in ``budget``, else the first ``HEAD_TAIL_HEAD_SHARE`` of it and the last rest."""
    if len(ids) <= budget:
        return ids
    head = round(budget * HEAD_TAIL_HEAD_SHARE)
    tail = budget - head
    return ids[:head] + (ids[-tail:] if tail else [])


def collate(tokenizer: PreTrainedTokenizerBase, rows: Sequence[list[int]], device: str) -> dict[str, torch.Tensor]:
    """Pad one batch of token ids to its longest row and move it to ``device``."""
    batch = tokenizer.pad({"input_ids": list(rows)}, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


class TransformersClassifier:
    """A loaded model version; ``classify`` is the daemon's only entry point into torch."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        labels: LabelSet,
        *,
        path: Path,
        manifest: Manifest,
        device: str,
        batch_size: int = 16,
        max_length: int = 256,
        baseline: Any = None,
        ensemble_weight: float = ensemble.DEFAULT_ENSEMBLE_WEIGHT,
        temperature: float = 1.0,
        ensemble_temperature: float = 1.0,
        truncation: str = "head",
        chunks: int = 1,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.labels: tuple[str, ...] = labels.labels
        self.path = path
        self.version: str = path.name
        self.manifest = manifest
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        # The fitted scikit-learn pipeline when this version serves the ensemble, else None.
        self.baseline = baseline
        self.serve = ensemble.SERVE_ENSEMBLE if baseline is not None else ensemble.SERVE_MODEL
        self.ensemble_weight = ensemble_weight
        # Logits are divided by this before the softmax (temperature scaling, fitted on validation
        # mail by the trainer): confidences then mean what they say, so thresholds do too.
        self.temperature = temperature
        self.ensemble_temperature = ensemble_temperature
        # How a text longer than max_length is cut: as the version was trained (manifest).
        self.truncation = truncation
        # Windows of max_length read per long text, their logits averaged: as trained (manifest).
        self.chunks = chunks
        # A model-only version's baseline.npz, loaded on the first explanation (never for classify).
        self._tfidf_view: Any = _NOT_LOADED

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw head outputs (n_texts x n_labels, fp32 on CPU), in input order."""
        if self.chunks > 1:
            return self._pooled_logits(texts)
        ids = tokenize(self.tokenizer, texts, self.max_length, self.truncation)
        # Batching texts of similar length wastes less compute on padding; the order is restored below.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty((len(ids), len(self.labels)), dtype=torch.float32)
        with torch.inference_mode(), autocast(self.device):
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = collate(self.tokenizer, [ids[i] for i in chunk], self.device)
                out[chunk] = self.model(**batch).logits.float().cpu()
        return out

    def _pooled_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """``logits`` of a version trained with chunks > 1: every window of a text through the model
        (``batch_size`` windows per pass, similar lengths together), then the mean per text."""
        windows = tokenize_windows(self.tokenizer, texts, self.max_length, self.truncation, self.chunks)
        flat = [(len(w), i, w) for i, text in enumerate(windows) for w in text]
        flat.sort(key=lambda item: item[0])
        window_logits = torch.empty((len(flat), len(self.labels)), dtype=torch.float32)
        with torch.inference_mode(), autocast(self.device):
            for start in range(0, len(flat), self.batch_size):
                batch = collate(self.tokenizer, [w for _, _, w in flat[start : start + self.batch_size]], self.device)
                window_logits[start : start + self.batch_size] = self.model(**batch).logits.float().cpu()
        return pool_logits(window_logits, torch.tensor([i for _, i, _ in flat]), len(texts))

    def classify_explained(self, texts: Sequence[str]) -> list[Prediction]:
        """``classify`` with each prediction's evidence (``mailtriage.core.explain``): the served part,
        the ensemble weight and the TF-IDF words. An ensemble's baseline features are computed once for
        its scores and its words; a version serving the model alone shows its baseline's words, if it
        has one, as a "TF-IDF view" that took no part in the decision."""
        if not texts:
            return []
        probs = torch.softmax(self.logits(texts) / self.temperature, dim=-1).numpy()
        if self.baseline is not None:
            base_p, features = ensemble.baseline_scored(self.baseline, texts, self.labels)
            probs = ensemble.ensemble_probs(probs, base_p, self.ensemble_weight, self.ensemble_temperature)
            return ensemble.explained_predictions(probs, self.labels, texts, part=self.serve,
                                                  weight=self.ensemble_weight, tfidf=self.baseline, features=features)
        if self._tfidf_view is _NOT_LOADED:
            self._tfidf_view = ensemble.view_baseline(self.path, self.labels)
        return ensemble.explained_predictions(probs, self.labels, texts, part=self.serve, tfidf=self._tfidf_view,
                                              role=explain.ROLE_VIEW)

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        if not texts:
            return []
        probs = torch.softmax(self.logits(texts) / self.temperature, dim=-1).numpy()
        if self.baseline is not None:
            probs = ensemble.ensemble_probs(probs, ensemble.baseline_probs(self.baseline, texts, self.labels),
                                            self.ensemble_weight, self.ensemble_temperature)
        predictions = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            predictions.append(
                Prediction(
                    label=self.labels[best],
                    confidence=row[best],
                    scores={label: p for label, p in zip(self.labels, row, strict=True)},
                )
            )
        return predictions

    def __repr__(self) -> str:
        return (f"TransformersClassifier(version={self.version!r}, labels={list(self.labels)}, "
                f"device={self.device!r}, serve={self.serve!r})")


_NOT_LOADED = object()

# peft's file name for adapter weights as safetensors (plain tensors; no code can hide in it).
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def set_cpu_threads(threads: int) -> None:
    """``threads`` > 0 sets torch's intra-op threads (process-wide); 0 keeps torch's default (one per core)."""
    if threads < 0:
        raise ModelError(f"threads = {threads!r} is negative; use 0 (torch's default) or a positive count")
    if threads:
        torch.set_num_threads(threads)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Merge the LoRA adapter into the base weights, then dynamically quantize every ``nn.Linear`` to
    int8 (weights int8 with one scale per output channel, activations quantized per batch; CPU only).
    The merge makes the adapter a plain weight update, so quantization sees ordinary Linear layers and
    the head keeps its trained weights. Per-channel weight scales, not one per tensor: on the demo
    inbox (300 held-out mails, MiniLM) one scale per tensor cost 2.0 points of accuracy (92.3% of
    predictions unchanged), per channel 0.3 points (97.0% unchanged); benchmarks/RESULTS.md §3."""
    if hasattr(model, "merge_and_unload"):  # a PeftModel: the adapter folded into the weights first
        model = model.merge_and_unload()
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the dynamic int8 path still works here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


# glibc's M_MMAP_THRESHOLD: an allocation this large that the heap's free top cannot hold gets a
# mapping of its own, unmapped when freed. glibc's default threshold grows (up to 32 MiB) each time
# a mapped block is freed, after which a forward pass's activations (tens of MiB each at 16 x 256
# tokens) are carved from the heap and stay there, fragmented, after the batch. Fixed, `mailtriage
# serve` filing 1,000 real-length mails with MiniLM (torch fp32) peaked at 709 MiB instead of 952.
_M_MMAP_THRESHOLD = -3
CPU_MMAP_THRESHOLD = 1 << 20


def bound_cpu_heap() -> bool:
    """Fix glibc's mmap threshold at ``CPU_MMAP_THRESHOLD`` for this process, so big CPU tensors go
    back to the system when freed; False where there is no glibc (nothing to do there)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def load_classifier(
    path: str | Path,
    device: str = "auto",
    batch_size: int = 16,
    max_length: int = 256,
    expected_labels: Sequence[str] | None = None,
    quantize: str = "none",
    threads: int = 0,
    runtime: str = "torch",
    compile: bool = False,
) -> TransformersClassifier | ensemble.BaselineClassifier:
    """Load MODEL_DIR, MODEL_DIR/current or a version directory; refuse labels that differ from config.

    What comes back is the version as served (manifest ``"serve"``): the fine-tuned model, the model
    averaged with the TF-IDF baseline, or the baseline alone (no torch model is loaded then).
    ``quantize="int8"`` serves a dynamically int8-quantized copy (CPU only; see ``quantize_int8``);
    ``threads`` > 0 sets torch's CPU thread count first. ``runtime="onnxruntime"`` serves the model
    from an ONNX Runtime session instead (CPU only; see ``mailtriage.model.onnxrt``), int8 there too.
    "auto" for either lets the device and the version choose (``choose_runtime``); the config's
    default. ``compile=True`` (GPU only) serves the model under ``torch.compile``. This function's
    own defaults stay torch fp32: the trainer scores versions with it, and fp32 is the reference the
    int8 check compares against.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ModelError(f"quantize = {quantize!r} is unknown; use one of {', '.join(QUANTIZE_CHOICES)}")
    if runtime not in RUNTIME_CHOICES:
        raise ModelError(f"runtime = {runtime!r} is unknown; use one of {', '.join(RUNTIME_CHOICES)}")
    set_cpu_threads(threads)
    version_dir, labels, manifest = open_version(path, expected_labels)
    # Before the model: a broken baseline fails in a second rather than after loading the weights.
    baseline = (ensemble.load_baseline(version_dir, labels.labels, manifest.baseline_temperature)
                if manifest.serve != ensemble.SERVE_MODEL else None)
    if manifest.serve == ensemble.SERVE_BASELINE:
        log.info("model_loaded", version=version_dir.name, labels=list(labels.labels), serve=manifest.serve)
        return ensemble.BaselineClassifier(baseline, labels.labels, path=version_dir, manifest=manifest)

    base = manifest.base_model or _adapter_base(version_dir)
    resolved_device = pick_device(device)
    auto = runtime == "auto"
    runtime, quantize = choose_runtime(runtime, quantize, resolved_device, manifest)
    if (quantize == "int8" or runtime == "onnxruntime") and resolved_device != "cpu":
        raise ModelError(
            f"quantize = {quantize!r} / runtime = {runtime!r} are CPU speed-ups, but the model runs on "
            f"{resolved_device!r}; set device = \"cpu\", or quantize = \"none\" and runtime = \"torch\" "
            "(on a GPU bf16 is used already)"
        )
    if compile and resolved_device != "cuda":
        raise ModelError(
            f"compile = true is a GPU speed-up (torch.compile of the bf16 model), but the model runs on "
            f"{resolved_device!r}; set compile = false (on a CPU, runtime = \"auto\" already serves a fused "
            "ONNX graph where the version allows it)"
        )
    dtype = pick_dtype(resolved_device)
    if resolved_device == "cpu":
        bound_cpu_heap()
    tokenizer = load_tokenizer(version_dir if (version_dir / "tokenizer_config.json").is_file() else base)
    from mailtriage.model import onnxrt

    if runtime == "onnxruntime" and auto and not onnxrt.available():
        log.warning("onnxruntime_missing", hint="runtime = \"auto\" serves torch fp32; pip install onnxruntime onnx")
        runtime, quantize = "torch", "none"

    def load_torch() -> torch.nn.Module:
        return _load_adapted(version_dir, base, labels, tokenizer, dtype, resolved_device)

    model: Any = None
    if runtime == "onnxruntime":
        try:
            model = onnxrt.serve(version_dir, base=str(base), quantize=quantize, threads=threads, load_torch=load_torch)
        except ModelError as exc:
            if not auto:
                raise
            # "auto" asked for speed, not for this runtime: a model that does not export still serves.
            log.warning("onnxruntime_unusable", error=str(exc), fallback="torch fp32")
            runtime, quantize = "torch", "none"
    if model is None:
        model = load_torch()
        if quantize == "int8":
            model = quantize_int8(model)
        elif resolved_device == "cuda":
            # Serving never trains: with the adapter folded into the bf16 base weights each adapted
            # Linear is one matrix product instead of three plus an add (benchmarks/gpu.py measures
            # both). On a CPU torch fp32 stays as trained: it is the reference int8 is checked against.
            model = model.merge_and_unload()
            if compile:
                # Compiled on the first batches (tens of seconds, again once when lengths vary).
                model = torch.compile(model)
    log.info(
        "model_loaded",
        version=version_dir.name,
        base_model=str(base),
        labels=list(labels.labels),
        device=resolved_device,
        dtype=str(dtype).removeprefix("torch."),
        serve=manifest.serve,
        quantize=quantize,
        runtime=runtime,
        chosen_by="auto" if auto else "config",
        compiled=compile,
        threads=torch.get_num_threads(),
    )
    return TransformersClassifier(
        model,
        tokenizer,
        labels,
        path=version_dir,
        manifest=manifest,
        device=resolved_device,
        batch_size=batch_size,
        max_length=max_length,
        baseline=baseline,
        ensemble_weight=manifest.ensemble_weight,
        temperature=manifest.temperature,
        ensemble_temperature=manifest.ensemble_temperature,
        truncation=manifest.truncation,
        chunks=manifest.chunks,
    )


def open_version(path: str | Path, expected_labels: Sequence[str] | None = None) -> tuple[Path, LabelSet, Manifest]:
    """Everything about a version but its weights, checked: (version dir, labels, manifest).

    A version without manifest.json (made by hand) gets the defaults older versions were served with.
    """
    version_dir = modeldir.resolve(Path(path))
    labels = LabelSet.load(version_dir)
    if expected_labels is not None:
        labels.check_matches(expected_labels, where=f"model version {str(version_dir)!r}")
    if not (version_dir / modeldir.ADAPTER_CONFIG_FILE).is_file():
        raise ModelError(
            f"{str(version_dir)!r} has labels.json but no {modeldir.ADAPTER_CONFIG_FILE}: the adapter is "
            "missing (training interrupted?); promote a complete version or retrain"
        )
    manifest = Manifest.load_or_default(version_dir)
    if manifest is None:
        log.warning("model_manifest_missing", path=str(version_dir))
        manifest = Manifest()
    _check_mailtext_version(manifest, version_dir)
    return version_dir, labels, manifest


def _load_adapted(version_dir: Path, base: str, labels: LabelSet, tokenizer: PreTrainedTokenizerBase,
                  dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The base model with the version's LoRA adapter and head, in eval mode on ``device``."""
    if not (version_dir / ADAPTER_WEIGHTS_FILE).is_file():
        # peft would fall back to adapter_model.bin, a pickle: never loaded from a model directory.
        raise ModelError(
            f"{str(version_dir)!r} has no {ADAPTER_WEIGHTS_FILE}; mailtriage loads adapter weights only as "
            "safetensors (an adapter_model.bin is a pickle, which can run code). Retrain with mailtriage-train"
        )
    model = load_base_model(base, labels, tokenizer, dtype)
    try:
        with quiet_transformers():
            # Imported here, not at the top: peft costs ~135 MiB of RSS, and a daemon serving a saved
            # ONNX graph never loads the torch model.
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(version_dir), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(
            f"the adapter in {str(version_dir)!r} does not fit base model {str(base)!r} with "
            f"{len(labels.labels)} labels: {exc}"
        ) from exc
    model.to(device)
    model.eval()
    return model


def _adapter_base(version_dir: Path) -> str:
    """Fallback when the manifest names no base model: peft records the one it was trained on."""
    path = version_dir / modeldir.ADAPTER_CONFIG_FILE
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{str(path)!r} is unreadable: {exc}") from exc
    if not base:
        raise ModelError(
            f"neither manifest.json nor {str(path)!r} names the base model; add \"base_model\" to manifest.json"
        )
    return str(base)


def _check_mailtext_version(manifest: Manifest, version_dir: Path) -> None:
    """Refuse an adapter trained on another mail-text version: it learned from differently prepared
    text, so its held-out numbers say nothing about what it would do here (train/serve skew)."""
    from mailtriage.core.mailtext import MAILTEXT_VERSION

    trained_with = manifest.mailtext_version
    if trained_with is None:
        log.warning("model_mailtext_version_unknown", path=str(version_dir), running=MAILTEXT_VERSION)
        return
    if str(trained_with) != str(MAILTEXT_VERSION):
        raise ModelError(
            f"model version {str(version_dir)!r} was trained on mail text version {trained_with!r}, but this "
            f"mailtriage prepares mail text version {MAILTEXT_VERSION!r}: the model would see text prepared "
            "differently from what it learned on. Retrain with mailtriage-train (it records the running "
            "version), or run the mailtriage release that trained this model"
        )

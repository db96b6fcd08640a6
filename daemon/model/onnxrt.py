"""ONNX Runtime serving: the CPU fast path, ``[model] runtime = "onnxruntime"``.

torch still loads the version (base + LoRA adapter + trained head, exactly as ``load_classifier``
does); this module then folds the adapter into the weights, exports the result to ONNX, fuses a
BERT-style encoder's attention, GELU and layer norms with onnxruntime's transformer optimizer,
optionally quantizes the weights to int8 per output channel, and serves it from an ONNX Runtime
session. The torch model is dropped afterwards, so only the session's weights stay in memory.

Why: on 2 CPU cores the fused graph does the same arithmetic with fewer, larger kernels;
benchmarks/RESULTS.md §7 has the speed and the accuracy of each variant. The export runs at every
load (a few seconds for MiniLM) into a temporary folder, so nothing is written next to the model
and a version never carries a stale ONNX file.

onnxruntime and onnx come with the ``onnx`` extra (``pip install 'mailtriage[onnx]'``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import structlog
import torch

from mailtriage.errors import ModelError

log = structlog.get_logger(__name__)

# model_type values of transformers configs whose graphs onnxruntime's "bert" optimizer fuses
# (encoder self-attention with an additive mask); other families get onnxruntime's generic graph
# optimizations only.
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet")
_INPUTS = ("input_ids", "attention_mask")


def _require() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            "model.runtime = \"onnxruntime\" needs the onnxruntime and onnx packages, which are not installed: "
            "pip install 'mailtriage[onnx]' (or set runtime = \"torch\")"
        ) from exc
    return onnxruntime


class OrtModel:
    """An ONNX Runtime session called like the torch model: ``model(input_ids=, attention_mask=).logits``."""

    def __init__(self, session: Any, *, quantize: str, fused: dict[str, int]) -> None:
        self.session = session
        self.quantize = quantize
        self.fused = fused

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.cpu().numpy(),
                                                  "attention_mask": attention_mask.cpu().numpy()})
        return SimpleNamespace(logits=torch.from_numpy(logits))


def _export(model: torch.nn.Module, path: Path) -> None:
    """Trace ``model`` (merged, eval mode) to ONNX with dynamic batch and sequence axes."""
    if hasattr(model, "set_attn_implementation"):
        # The optimizer recognises the eager attention pattern (matmul, add mask, softmax, matmul)
        # and fuses it into one Attention node; the SDPA graph it leaves unfused (measured: 0 of 6).
        model.set_attn_implementation("eager")
    if getattr(model.config, "use_cache", False):
        # A decoder would return its key/value cache (a DynamicCache the tracer cannot carry);
        # a classifier reads one forward pass and needs none.
        model.config.use_cache = False
    example = torch.ones((2, 8), dtype=torch.long)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation; it still works here
        torch.onnx.export(
            model,
            (example, torch.ones_like(example)),
            str(path),
            input_names=list(_INPUTS),
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                          "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


@contextlib.contextmanager
def _quiet() -> Any:
    """onnxruntime's optimizer and quantizer log advice through the root logger (embedding table sizes,
    "consider pre-processing") that means nothing to a mail admin; keep it out of the daemon's log."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _fuse(path: Path, config: Any, out: Path) -> dict[str, int]:
    """Write the fused form of the BERT-style graph at ``path`` to ``out``; the counts of fused operators."""
    from onnxruntime.transformers import optimizer

    with _quiet():
        optimized = optimizer.optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                                             hidden_size=config.hidden_size, opt_level=0)
    optimized.save_model_to_file(str(out))
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def _quantize_int8(path: Path, out: Path) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per output channel, as the torch int8 path does: one scale per tensor cost 2 points on the demo
    # inbox there. DefaultTensorType: the fused graph's custom ops carry no type information.
    with _quiet():
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})


def _release_memory() -> None:
    """Give the export's graph copies (and, once the caller drops it, the torch model) back to the
    system: without this the serving process kept ~1.25 GiB after loading MiniLM, with it ~0.65 GiB
    (measured, glibc)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def session_model(model: torch.nn.Module, *, quantize: str, threads: int) -> OrtModel:
    """Export the loaded (peft) ``model`` to an ONNX Runtime session; ``quantize`` is "none" or "int8"."""
    ort = _require()
    started = time.monotonic()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.float().eval()
    config = model.config
    fused: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="mailtriage-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            _export(model, path)
        except Exception as exc:  # the exporter raises many types; all mean "this model does not export"
            raise ModelError(
                f"exporting the {type(model).__name__} to ONNX failed ({type(exc).__name__}: {exc}); "
                "serve it with model.runtime = \"torch\""
            ) from exc
        if getattr(config, "model_type", None) in _BERT_LIKE:
            fused = _fuse(path, config, Path(tmp) / "fused.onnx")
            path = Path(tmp) / "fused.onnx"
        if quantize == "int8":
            _quantize_int8(path, Path(tmp) / "int8.onnx")
            path = Path(tmp) / "int8.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Read into memory before the temporary folder goes away.
        session = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
    del model
    _release_memory()
    log.info("onnx_session_ready", seconds=round(time.monotonic() - started, 1), quantize=quantize,
             fused=fused, threads=threads or "default")
    return OrtModel(session, quantize=quantize, fused=fused)

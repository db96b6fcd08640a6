"""ONNX Runtime serving: the CPU fast path, ``[model] runtime = "onnxruntime"`` (and what "auto" picks on a CPU).

torch loads the version (base + LoRA adapter + trained head, exactly as ``load_classifier`` does);
this module then folds the adapter into the weights, exports the result to ONNX, fuses a BERT-style
encoder's attention, GELU and layer norms with onnxruntime's transformer optimizer, optionally
quantizes the weights to int8 per output channel, and serves it from an ONNX Runtime session. The
torch model is dropped afterwards, so only the session's weights stay in memory.

Why: on 2 CPU cores the fused graph does the same arithmetic with fewer, larger kernels;
benchmarks/RESULTS.md §3 has the speed and the accuracy of each variant. The export costs seconds
and about half a GiB of peak memory, so the resulting graph is saved with the version
(``model.onnx`` / ``model.int8.onnx``, 0600, with a ``.json`` record of what it was made from) and
the next load reads it instead, without loading the torch model at all. A saved graph is used only
when its record matches this version's adapter, labels and base model, its bytes match the hash in
the record, and it holds nothing but plain ONNX and onnxruntime operators with the weights inside;
anything else is exported again. No custom-operator library is ever registered with a session, so
a graph cannot make onnxruntime load code.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import structlog
import torch

from mailtriage.core.labels import LABELS_FILE
from mailtriage.errors import ModelError
from mailtriage.model import modeldir

log = structlog.get_logger(__name__)

# model_type values of transformers configs whose graphs onnxruntime's "bert" optimizer fuses
# (encoder self-attention with an additive mask); other families get onnxruntime's generic graph
# optimizations only.
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet")
_INPUTS = ("input_ids", "attention_mask")


# The saved graph per quantization, next to the adapter; each has a record ``<name>.json``.
GRAPH_FILES = {"none": "model.onnx", "int8": "model.int8.onnx"}
# Bumped whenever the export, fusion or quantization recipe changes, so graphs from before are redone.
GRAPH_FORMAT = 1
# Operator domains a saved graph may use: standard ONNX, and onnxruntime's built-in contrib operators
# that fusion and quantization produce. Anything else would need a custom-operator library.
_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})


def _require() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            "model.runtime = \"onnxruntime\" needs the onnxruntime and onnx packages, which are not installed "
            "(they are dependencies of mailtriage: reinstall it, or pip install onnxruntime onnx); "
            "or set runtime = \"torch\""
        ) from exc
    return onnxruntime


def model_type(base: str) -> str:
    """The transformers ``model_type`` of a base model ("bert", "qwen2", ...), from its config alone."""
    from transformers import AutoConfig

    try:
        return str(AutoConfig.from_pretrained(modeldir.resolve_base_model(base)).model_type)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base model {base!r} has no readable config.json: {exc}") from exc


def available() -> bool:
    """Whether onnxruntime and onnx import here ("auto" falls back to torch where they do not)."""
    try:
        _require()
        import onnx  # noqa: F401
    except (ModelError, ImportError):
        return False
    return True


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


def _release_memory(collect: bool = True) -> None:
    """Give the export's graph copies (and, once the caller drops it, the torch model) back to the
    system: without this the serving process kept ~1.25 GiB after loading MiniLM, with it ~0.65 GiB
    (measured, glibc). ``collect=False`` skips the cycle collection (no torch model to free; it cost
    up to a second in a process that had loaded one)."""
    if collect:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _session(ort: Any, graph: bytes, threads: int) -> Any:
    """An onnxruntime session on ``graph`` (bytes, so nothing is resolved relative to a folder)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Deliberately no options.register_custom_ops_library: a graph's operators come from onnxruntime.
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def session_model(model: torch.nn.Module, *, quantize: str, threads: int) -> tuple[OrtModel, bytes]:
    """Export the loaded (peft) ``model`` to an ONNX Runtime session; ``quantize`` is "none" or "int8".
    Returns the model and the graph's bytes (what ``save_graph`` stores)."""
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
        if getattr(config, "model_type", None) in BERT_LIKE:
            fused = _fuse(path, config, Path(tmp) / "fused.onnx")
            path = Path(tmp) / "fused.onnx"
        if quantize == "int8":
            _quantize_int8(path, Path(tmp) / "int8.onnx")
            path = Path(tmp) / "int8.onnx"
        # Read into memory before the temporary folder goes away.
        graph = path.read_bytes()
    session = _session(ort, graph, threads)
    del model
    _release_memory()
    log.info("onnx_graph_exported", seconds=round(time.monotonic() - started, 1), quantize=quantize,
             fused=fused, threads=threads or "default")
    return OrtModel(session, quantize=quantize, fused=fused), graph


# ---- the graph saved with the version -------------------------------------------------------------


def fingerprint(version_dir: Path, base: str, quantize: str) -> str:
    """What a saved graph was made from, as one sha256: the adapter's weights and config, the labels,
    the base model (its name, config.json and the names and sizes of its weight files: hashing a
    multi-GB base at every start would cost what the saved graph saves), the quantization, the recipe
    version and the onnxruntime version that fused and quantized it."""
    from mailtriage.model.transformers import ADAPTER_WEIGHTS_FILE

    digest = hashlib.sha256()

    def add(name: str, value: bytes) -> None:
        digest.update(f"{name}\0{len(value)}\0".encode() + value)

    add("format", str(GRAPH_FORMAT).encode())
    add("quantize", quantize.encode())
    add("onnxruntime", str(getattr(_require(), "__version__", "?")).encode())
    for name in (ADAPTER_WEIGHTS_FILE, modeldir.ADAPTER_CONFIG_FILE, LABELS_FILE):
        add(name, _sha256(Path(version_dir) / name).encode())
    add("base_model", modeldir.base_model_name(base).encode())
    location = Path(modeldir.resolve_base_model(base))
    if location.is_dir():
        if (location / "config.json").is_file():
            add("base:config.json", _sha256(location / "config.json").encode())
        for weights in sorted(location.glob("*.safetensors")) + sorted(location.glob("*.bin")):
            add(f"base:{weights.name}", str(weights.stat().st_size).encode())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_path(graph: Path) -> Path:
    return graph.with_name(graph.name + ".json")


def load_graph(version_dir: Path, *, base: str, quantize: str, threads: int) -> OrtModel | None:
    """The session on the version's saved graph, or None when there is none or it is not this
    version's (logged with the reason; the caller exports again)."""
    ort = _require()
    started = time.monotonic()
    graph_file = Path(version_dir) / GRAPH_FILES[quantize]
    if not graph_file.is_file():
        return None

    def refuse(reason: str, *, stale: bool = False) -> None:
        # A graph left from before a refit or an upgrade is routine; one that fails its own hash or
        # holds foreign operators was changed by someone.
        (log.info if stale else log.warning)("onnx_graph_refused", path=str(graph_file), reason=reason)

    try:
        record = json.loads(_record_path(graph_file).read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        refuse(f"its record {_record_path(graph_file).name} is missing or unreadable ({exc})")
        return None
    if record.get("format") != GRAPH_FORMAT or record.get("quantize") != quantize:
        refuse(f"made by another export recipe (format {record.get('format')!r}, expected {GRAPH_FORMAT})", stale=True)
        return None
    if record.get("fingerprint") != fingerprint(version_dir, base, quantize):
        refuse("made from another adapter, label set, base model or onnxruntime than this version's", stale=True)
        return None
    graph = graph_file.read_bytes()
    if hashlib.sha256(graph).hexdigest() != record.get("graph_sha256"):
        refuse("its bytes do not match the sha256 in its record (changed or truncated)")
        return None
    problem = _foreign_content(graph)
    if problem:
        refuse(problem)
        return None
    try:
        session = _session(ort, graph, threads)
    except Exception as exc:  # onnxruntime raises its own exception types for graphs it cannot run
        refuse(f"onnxruntime cannot run it ({type(exc).__name__}: {exc})")
        return None
    fused = record.get("fused") if isinstance(record.get("fused"), dict) else {}
    del graph
    _release_memory(collect=False)
    log.info("onnx_graph_loaded", path=str(graph_file), seconds=round(time.monotonic() - started, 2),
             quantize=quantize, threads=threads or "default")
    # Reported (tests, the export log), never acted on; a hand-edited value that is no count is dropped.
    return OrtModel(session, quantize=quantize,
                    fused={str(k): v for k, v in fused.items() if type(v) is int})


def _foreign_content(graph: bytes) -> str | None:
    """Why ``graph`` is not what the export writes (weights stored outside it, local functions or
    operators outside standard ONNX and onnxruntime's own), or None when it is plain."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(graph)
    except (DecodeError, ValueError, RuntimeError) as exc:
        return f"it is not an ONNX model ({type(exc).__name__}: {exc})"
    if model.functions:
        return "it defines its own functions, which the export never writes"
    domains = {op.domain for op in model.opset_import} | {node.domain for node in model.graph.node}
    if domains - _DOMAINS:
        return f"it uses operators of {sorted(domains - _DOMAINS)}, outside standard ONNX and onnxruntime's own"
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        return "it keeps weights in files outside the graph"
    if any(attr.g.node or attr.graphs for node in model.graph.node for attr in node.attribute):
        return "it holds sub-graphs, which the export never writes"
    return None


def save_graph(version_dir: Path, graph: bytes, *, base: str, quantize: str, fused: dict[str, int]) -> bool:
    """Store ``graph`` with the version (graph first, then its record: a record never names a graph
    that is not there). False, logged, when the folder is not writable: the next load exports again."""
    graph_file = Path(version_dir) / GRAPH_FILES[quantize]
    record = {
        "format": GRAPH_FORMAT,
        "quantize": quantize,
        "fingerprint": fingerprint(version_dir, base, quantize),
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "fused": fused,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    try:
        if not os.access(version_dir, os.W_OK):
            raise PermissionError(f"{str(version_dir)!r} is not writable by this process")
        modeldir.write_private(graph_file, lambda fh: fh.write(graph))
        modeldir.write_private(_record_path(graph_file), lambda fh: fh.write(text))
    except OSError as exc:
        log.warning("onnx_graph_not_saved", path=str(graph_file), error=str(exc),
                    hint="each load exports the graph again; let the service user write the version folder")
        return False
    log.info("onnx_graph_saved", path=str(graph_file), bytes=len(graph))
    return True


def serve(version_dir: Path, *, base: str, quantize: str, threads: int,
          load_torch: Callable[[], torch.nn.Module]) -> OrtModel:
    """The version as an onnxruntime model: from its saved graph when that is this version's, else
    ``load_torch()`` exported (and saved with the version when its folder is writable)."""
    saved = load_graph(version_dir, base=base, quantize=quantize, threads=threads)
    if saved is not None:
        return saved
    model, graph = session_model(load_torch(), quantize=quantize, threads=threads)
    save_graph(version_dir, graph, base=base, quantize=quantize, fused=model.fused)
    del graph
    _release_memory(collect=False)
    return model

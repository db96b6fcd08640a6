"""finetune(): learns the toy set on a tiny model, saves a loadable version, is seeded and stops early;
batches grouped by length; progress as a bar on a terminal, as log lines elsewhere."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mailtriage.model import modeldir
from mailtriage.errors import TrainingDataError
from mailtriage.core.labels import LabelSet
from tests.models import TINY_MODEL_SEED, TOY_LABELS, toy_dataset, toy_params


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
    assert manifest["base_model"] and manifest["training"]["params"]["seed"] == TINY_MODEL_SEED
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


@pytest.mark.component
def test_bf16_training_steps_learn_and_are_recorded(tiny_encoder_base: Path, tmp_path: Path) -> None:
    """precision = "bf16" on a CPU: the steps run under bf16 autocast (fast on AMX), the saved weights
    are fp32, validation and serving compute in fp32, and the manifest says what the steps ran in."""
    from safetensors.torch import load_file

    from mailtriage.model.transformers import load_classifier

    train, val = toy_dataset()
    result = finetune_into(tiny_encoder_base, tmp_path, toy_params(precision="bf16"), train, val)
    assert result.precision == "bf16" and result.val_accuracy >= 0.8, result.history
    manifest = modeldir.read_manifest(tmp_path)
    assert manifest["training"]["result"]["precision"] == "bf16"
    assert manifest["training"]["params"]["precision"] == "bf16"
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    clf = load_classifier(tmp_path, device="cpu", max_length=64)
    [pred] = clf.classify(["please fix my invoice"])
    assert pred.label in TOY_LABELS


@pytest.mark.pure
def test_precision_auto_is_bf16_only_where_it_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from mailtriage.model import transformers as mt

    monkeypatch.setattr(mt, "cpu_has_amx_bf16", lambda: True)
    assert [mt.training_precision(d, "auto") for d in ("cpu", "cuda", "mps")] == ["bf16", "bf16", "fp32"]
    monkeypatch.setattr(mt, "cpu_has_amx_bf16", lambda: False)
    assert [mt.training_precision(d, "auto") for d in ("cpu", "cuda", "mps")] == ["fp32", "bf16", "fp32"]
    assert mt.training_precision("cpu", "bf16") == "bf16" and mt.training_precision("cuda", "fp32") == "fp32"


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


@pytest.mark.pure
def test_length_grouped_batches_cover_every_example_once_and_repeat_per_seed() -> None:
    import random

    import torch

    from mailtriage_trainer.finetune import GROUP_BATCHES, length_grouped_batches

    rng = random.Random(3)
    lengths = [rng.randint(5, 256) for _ in range(2 * 16 * GROUP_BATCHES + 37)]  # two full groups + a short one

    def epochs(seed: int, n: int = 2) -> list[list[list[int]]]:
        gen = torch.Generator().manual_seed(seed)
        return [length_grouped_batches(lengths, 16, gen) for _ in range(n)]

    first, second = epochs(13)
    for batches in (first, second):
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each example once an epoch
        assert len(batches) == math.ceil(len(lengths) / 16)  # the optimizer step count finetune plans with
        assert sum(len(b) < 16 for b in batches) == 1
    assert first != second  # a new order and new batch mates every epoch
    assert epochs(13) == [first, second]  # the same seed, the same batches
    assert epochs(14)[0] != first

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(13)).tolist()
    random_batches = [shuffled[i : i + 16] for i in range(0, len(shuffled), 16)]
    assert padded(first) < 0.75 * padded(random_batches)  # grouping is what saves the compute
    assert padded(first) < 1.05 * sum(lengths)


@pytest.mark.component
def test_milestones_are_logged_and_no_bar_is_drawn_off_a_terminal(
    tiny_encoder_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailtriage_trainer import finetune

    monkeypatch.setattr(finetune, "PROGRESS_LOG_SECONDS", 0.0)  # a progress line after every step
    train, val = toy_dataset(augment=0)
    with capture_logs() as logs:
        result = finetune_into(tiny_encoder_base, tmp_path, toy_params(epochs=2, patience=5), train, val, progress=True)
    events = [e["event"] for e in logs]
    assert events.count("finetune_epoch_start") == 2 and events.count("finetune_epoch") == 2, events
    assert events.index("finetune_start") < events.index("finetune_epoch_start") < events.index("finetune_epoch")
    assert events[-1] == "finetune_done"
    ends = [e for e in logs if e["event"] == "finetune_epoch"]
    for end, row in zip(ends, result.history, strict=True):
        assert end["train_loss"] == round(row["train_loss"], 4) and end["val_macro_f1"] == round(row["val_macro_f1"], 4)
        assert end["elapsed_s"] >= end["seconds"] - 0.1 and end["epochs"] == 2
    assert ends[0]["eta_s"] is not None and ends[0]["eta_s"] >= 0 and ends[1]["eta_s"] == 0
    starts = [e for e in logs if e["event"] == "finetune_epoch_start"]
    assert starts[0]["eta_s"] is None and starts[1]["eta_s"] is not None  # no pace before the first epoch
    steps = [e for e in logs if e["event"] == "finetune_progress"]
    assert [e["steps_done"] for e in steps] == list(range(1, result.steps + 1))
    assert steps[-1]["eta_s"] == 0 and all(e["steps"] == result.steps for e in steps)
    assert "fine-tuning" not in capsys.readouterr().err  # stderr is not a terminal under pytest: no bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.component
def test_a_terminal_gets_a_bar_with_the_time_left(
    tiny_encoder_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, val = toy_dataset(augment=0)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with capture_logs() as logs:
        finetune_into(tiny_encoder_base, tmp_path, toy_params(epochs=1), train, val, progress=True)
    drawn = terminal.getvalue()
    assert "fine-tuning" in drawn and "epoch=1" in drawn and "<" in drawn, drawn  # tqdm's "elapsed<left"
    assert "finetune_progress" not in [e["event"] for e in logs]  # the bar says it; no log lines in between


def finetune_into(base, out_dir, params, train, val, progress=False):  # type: ignore[no-untyped-def]
    from mailtriage_trainer.finetune import finetune

    return finetune(base, train, val, LABELS, out_dir, params, progress=progress)

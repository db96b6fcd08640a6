"""Long mail: ``head`` keeps the first max_length tokens, ``head_tail`` the first quarter and the end;
the trainer records the choice and serving cuts the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailtriage.core.labels import LabelSet
from mailtriage.core.training import TrainParams
from mailtriage.errors import ConfigError, ModelError
from mailtriage.model import modeldir
from tests.models import TOY_LABELS, toy_dataset, toy_params


LONG = "refund " + " ".join(f"word{i}" for i in range(300)) + " invoice"


@pytest.mark.pure
@pytest.mark.parametrize(
    ("n", "budget", "expected"),
    [
        (5, 8, [0, 1, 2, 3, 4]),                   # fits: untouched
        (8, 8, list(range(8))),                    # exactly fits
        (20, 8, [0, 1, 14, 15, 16, 17, 18, 19]),   # 2 from the head (a quarter of 8), 6 from the tail
        (100, 254, list(range(100))),
        (600, 254, list(range(64)) + list(range(410, 600))),  # 256 tokens minus [CLS]/[SEP]: 64 + 190
        (3, 1, [2]),                               # round(0.25) = 0 from the head: all from the tail
    ],
)
def test_head_tail_selection(n: int, budget: int, expected: list[int]) -> None:
    from mailtriage.model.transformers import head_tail

    got = head_tail(list(range(n)), budget)
    assert got == expected
    assert len(got) == min(n, budget)


@pytest.mark.component
def test_tokenize_head_tail_keeps_special_tokens_start_and_end(tiny_encoder_base: Path, tiny_decoder_base: Path) -> None:
    from mailtriage.model.transformers import load_tokenizer, tokenize

    for base in (tiny_encoder_base, tiny_decoder_base):
        tok = load_tokenizer(base)
        full = tok([LONG])["input_ids"][0]
        plain = tok([LONG], add_special_tokens=False)["input_ids"][0]
        special = len(full) - len(plain)  # 2 on BERT ([CLS] ... [SEP]), 0 on the Qwen-style decoder
        prefix = 1 if special else 0
        head, head_tail_ids = (tokenize(tok, [LONG, "refund"], 32, mode) for mode in ("head", "head_tail"))
        # head is what the tokenizer's own truncation gives (unchanged behaviour for existing versions)
        assert head == [list(ids) for ids in tok([LONG, "refund"], truncation=True, max_length=32)["input_ids"]]
        # a short text is the same either way
        assert head_tail_ids[1] == head[1]
        row = head_tail_ids[0]
        budget = 32 - special
        assert len(row) == 32
        assert row[:prefix] == full[:prefix] and row[len(row) - (special - prefix):] == full[len(full) - (special - prefix):]
        body = row[prefix:len(row) - (special - prefix)]
        assert body == plain[: round(budget / 4)] + plain[-(budget - round(budget / 4)):]
        assert tok.decode(body).split()[-1] == "invoice"  # the end of the mail is in; head-only loses it
        assert "invoice" not in tok.decode(head[0])
    with pytest.raises(ModelError, match="truncation = 'middle' is unknown"):
        tokenize(tok, ["x"], 8, "middle")


@pytest.mark.pure
def test_truncation_is_validated_and_read_from_the_config(tmp_path: Path) -> None:
    from mailtriage.config import TrainingConfig

    assert TrainParams().truncation == "head"
    assert TrainParams(truncation="head_tail").truncation == "head_tail"
    with pytest.raises(ConfigError, match="truncation = 'tail'.*head_tail"):
        TrainParams(truncation="tail")
    assert TrainingConfig(truncation="head_tail").params().truncation == "head_tail"
    with pytest.raises(ConfigError, match="truncation"):
        TrainingConfig(truncation="both")


@pytest.mark.pure
def test_trained_truncation_from_both_manifest_shapes() -> None:
    from mailtriage.model.manifest import Manifest

    def trained_truncation(data: dict[str, object]) -> str:
        return Manifest.from_dict(data, where="manifest.json of 'v'").truncation

    assert trained_truncation({}) == "head"  # versions from before the option
    assert trained_truncation({"params": {"truncation": "head_tail"}}) == "head_tail"  # mailtriage-train
    assert trained_truncation({"training": {"params": {"truncation": "head_tail"}}}) == "head_tail"  # finetune()
    assert trained_truncation({"params": {"seed": 1}}) == "head"
    with pytest.raises(ModelError, match="params.truncation = 'tail'.*retrain"):
        trained_truncation({"params": {"truncation": "tail"}})


@pytest.mark.component
def test_a_version_trained_with_head_tail_serves_with_head_tail(tiny_encoder_base: Path, tmp_path: Path) -> None:
    import torch

    from mailtriage.model.transformers import load_classifier, tokenize
    from mailtriage_trainer.finetune import finetune

    train, val = toy_dataset(augment=0)
    version = tmp_path / "v"
    finetune(tiny_encoder_base, train, val, LabelSet(TOY_LABELS), version,
             toy_params(epochs=1, max_length=32, truncation="head_tail"), progress=False)  # type: ignore[arg-type]
    assert modeldir.read_manifest(version)["training"]["params"]["truncation"] == "head_tail"
    clf = load_classifier(version, device="cpu", max_length=32)
    assert clf.truncation == "head_tail"
    texts = [LONG, "refund please"]
    served = clf.logits(texts)
    with torch.inference_mode():
        for text, logits in zip(texts, served, strict=True):
            ids = tokenize(clf.tokenizer, [text], 32, "head_tail")[0]
            assert torch.allclose(clf.model(input_ids=torch.tensor([ids])).logits[0], logits, atol=1e-5)
        head_ids = tokenize(clf.tokenizer, [LONG], 32, "head")[0]
        assert not torch.allclose(clf.model(input_ids=torch.tensor([head_ids])).logits[0], served[0], atol=1e-5)


@pytest.mark.pure
def test_the_trainer_flag_and_the_config_key_reach_the_params(tmp_path: Path) -> None:
    from mailtriage.config import load_config
    from mailtriage_trainer.cli import _settings, build_train_parser

    parse = build_train_parser().parse_args
    assert _settings(parse(["--data", "x"]), None).params.truncation == "head"
    assert _settings(parse(["--data", "x", "--truncation", "head_tail"]), None).params.truncation == "head_tail"
    config = tmp_path / "c.toml"
    config.write_text('[categories]\nbilling = "Support/Billing"\nlogin = "Support/Login"\n\n[training]\ntruncation = "head_tail"\n')
    cfg = load_config(config)
    assert _settings(parse(["--data", "x"]), cfg).params.truncation == "head_tail"
    assert _settings(parse(["--data", "x", "--truncation", "head"]), cfg).params.truncation == "head"

"""The trainer's flags go through the same rules as the config keys they override."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailtriage.config import ModelConfig, TrainingConfig, load_config
from mailtriage.core.training import PRECISION_CHOICES, SERVE_SETTINGS, TRUNCATION_CHOICES
from mailtriage.errors import ConfigError
from mailtriage.model import ensemble
from mailtriage_trainer.cli import EXIT_ERROR, _settings, build_train_parser, main

pytestmark = pytest.mark.pure

parse = build_train_parser().parse_args

# (flag, value, the [training] / [model] key it overrides, whether the key refuses the value)
CASES = [
    ("--holdout-fraction", "0.9", "holdout_fraction", True),
    ("--holdout-fraction", "0.6", "holdout_fraction", True),
    ("--holdout-fraction", "0.01", "holdout_fraction", True),
    ("--holdout-fraction", "0.05", "holdout_fraction", False),
    ("--holdout-fraction", "0.5", "holdout_fraction", False),
    ("--min-examples", "0", "min_examples_per_class", True),
    ("--min-examples", "1", "min_examples_per_class", False),
    ("--target-accuracy", "0.4", "target_accuracy", True),
    ("--target-accuracy", "1.0", "target_accuracy", True),
    ("--target-accuracy", "0", "target_accuracy", False),
    ("--target-accuracy", "0.98", "target_accuracy", False),
    ("--threshold", "1.5", "threshold", True),
    ("--threshold", "0", "threshold", False),
    ("--epochs", "0", "epochs", True),
    ("--learning-rate", "2", "learning_rate", True),
]


def _key_refuses(key: str, value: str) -> bool:
    table = ModelConfig if key == "threshold" else TrainingConfig
    kind = int if key in ("min_examples_per_class", "epochs") else float
    try:
        table(**{key: kind(value)})
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize(("flag", "value", "key", "refused"), CASES)
def test_a_flag_refuses_what_its_config_key_refuses(flag: str, value: str, key: str, refused: bool) -> None:
    assert _key_refuses(key, value) == refused
    args = parse(["--data", "x", flag, value])
    if refused:
        with pytest.raises(ConfigError, match=flag):
            _settings(args, None)
    else:
        _settings(args, None)


def test_a_refused_flag_exits_2_before_any_data_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILTRIAGE_CONFIG", raising=False)
    monkeypatch.setattr("mailtriage_trainer.cli.DEFAULT_CONFIG", "/nonexistent/mailtriage.toml")
    code = main(["--data", str(tmp_path / "missing"), "--holdout-fraction", "0.9", "--dry-run"])
    assert code == EXIT_ERROR
    assert "--holdout-fraction" in capsys.readouterr().err


def test_flags_override_the_config_and_keep_what_they_do_not_name(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[categories]\nbilling = "Support/Billing"\nlogin = "Support/Login"\n\n'
                      '[model]\nthreshold = 0.7\nmax_length = 128\n\n'
                      '[training]\nholdout_fraction = 0.3\nserve = "ensemble"\nepochs = 3\n')
    cfg = load_config(config)
    s = _settings(parse(["--data", "x"]), cfg)
    assert (s.holdout_fraction, s.serve, s.threshold, s.params.epochs, s.params.max_length) == (0.3, "ensemble", 0.7, 3, 128)
    s = _settings(parse(["--data", "x", "--holdout-fraction", "0.1", "--serve", "model", "--threshold", "0.5",
                         "--epochs", "2", "--max-length", "64"]), cfg)
    assert (s.holdout_fraction, s.serve, s.threshold, s.params.epochs, s.params.max_length) == (0.1, "model", 0.5, 2, 64)
    with pytest.raises(ConfigError, match="--max-length"):
        _settings(parse(["--data", "x", "--max-length", "0"]), cfg)


def test_choices_are_the_configs_allowed_values() -> None:
    actions = {a.dest: a for a in build_train_parser()._actions}
    assert tuple(actions["serve"].choices) == SERVE_SETTINGS
    assert tuple(actions["truncation"].choices) == TRUNCATION_CHOICES
    assert tuple(actions["precision"].choices) == PRECISION_CHOICES
    with pytest.raises(ConfigError, match=r"precision = 'fp16'.*\[training\] precision"):
        TrainingConfig(precision="fp16")
    # What --serve and [training] serve name besides "auto" is what a version can serve.
    assert set(SERVE_SETTINGS) - {"auto"} == set(ensemble.SERVE_CHOICES)
    for serve in SERVE_SETTINGS:
        assert TrainingConfig(serve=serve).serve == serve

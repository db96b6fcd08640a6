"""The typed manifest: defaults for older versions, a round trip, and hostile values refused by key.

A manifest.json is a file anyone with write access to the model directory can edit, so every value
the daemon acts on is fuzzed here: the only outcomes allowed are a Manifest whose numbers are all
finite and in range, or a ModelError that names the key.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtriage.core.labels import LabelSet
from mailtriage.errors import ModelError
from mailtriage.model import modeldir
from mailtriage.model.manifest import TEMPERATURE_MAX, TEMPERATURE_MIN, Manifest

pytestmark = pytest.mark.pure

LABELS = ("billing", "login", "refunds")


def test_an_empty_manifest_gets_the_defaults_older_versions_were_served_with() -> None:
    m = Manifest.from_dict({})
    assert (m.serve, m.temperature, m.ensemble_weight, m.ensemble_temperature, m.baseline_temperature,
            m.truncation) == ("model", 1.0, 0.5, 1.0, 1.0, "head")
    assert m.base_model is None and m.mailtext_version is None and m.macro_f1 is None and m.gate_decision is None
    assert m == Manifest()


def test_truncation_is_read_where_each_writer_puts_it() -> None:
    assert Manifest.from_dict({"params": {"truncation": "head_tail"}}).truncation == "head_tail"
    assert Manifest.from_dict({"training": {"params": {"truncation": "head_tail"}}}).truncation == "head_tail"


def test_save_and_load_round_trip_keeps_unmodelled_keys(tmp_path: Path) -> None:
    data = {"version": "20260101-000000", "created": "2026-01-01T00:00:00Z", "base_model": "b",
            "mailtext_version": "3", "labels": list(LABELS), "threshold": 0.6, "serve": "ensemble",
            "temperature": 1.7, "ensemble_weight": 0.3, "ensemble_temperature": 0.8, "baseline_temperature": 0.4,
            "params": {"truncation": "head_tail", "epochs": 3}, "metrics": {"macro_f1": 0.9, "accuracy": 0.95, "n": 9},
            "gate": {"promoted": True, "decision": "promoted"}, "data": {"all": {"n": 30}}}
    modeldir.write_manifest(tmp_path, data)
    m = Manifest.load(tmp_path)
    assert (m.serve, m.temperature, m.ensemble_weight, m.truncation, m.labels) == (
        "ensemble", 1.7, 0.3, "head_tail", LABELS)
    assert (m.macro_f1, m.accuracy, m.gate_decision) == (0.9, 0.95, "promoted")
    assert m.raw["data"] == {"all": {"n": 30}}
    assert m.to_dict() == data
    m.save(tmp_path / "")
    assert Manifest.load(tmp_path) == m and modeldir.read_manifest(tmp_path) == data


def test_mailtext_version_written_as_a_number_is_read_as_text() -> None:
    assert Manifest.from_dict({"mailtext_version": 3}).mailtext_version == "3"


# Each row: a hostile value, and what the error must name (the key, the value as shown, the range).
HOSTILE = [
    ({"temperature": 1e-300}, r'"temperature": 1e-300; expected a finite number in 0.01..100'),
    ({"temperature": "abc"}, r'"temperature": \'abc\' \(str\); expected a number'),
    ({"temperature": math.nan}, r'"temperature": nan; expected a finite number in 0.01..100'),
    ({"temperature": math.inf}, r'"temperature": inf; expected a finite'),
    ({"temperature": -1}, r'"temperature": -1.0; expected a finite'),
    ({"temperature": 0}, r'"temperature": 0.0; expected a finite'),
    ({"temperature": 1e300}, r'"temperature": 1e\+300; expected a finite'),
    ({"temperature": 10**400}, r'"temperature": inf; expected a finite'),
    ({"temperature": True}, r'"temperature": True \(bool\); expected a number'),
    ({"temperature": None}, r'"temperature": None \(NoneType\); expected a number'),
    ({"temperature": [1]}, r'"temperature": \[1\] \(list\); expected a number'),
    ({"ensemble_temperature": 1e-9}, r'"ensemble_temperature": 1e-09; expected a finite number in 0.01..100'),
    ({"baseline_temperature": -math.inf}, r'"baseline_temperature": -inf; expected a finite'),
    ({"ensemble_weight": math.nan}, r'"ensemble_weight": nan; expected a finite number in 0..1'),
    ({"ensemble_weight": 1.5}, r'"ensemble_weight": 1.5; expected a finite number in 0..1'),
    ({"ensemble_weight": -0.1}, r'"ensemble_weight": -0.1; expected a finite number in 0..1'),
    ({"ensemble_weight": "0.5"}, r'"ensemble_weight": \'0.5\' \(str\); expected a number'),
    ({"serve": "best-guess"}, r"\"serve\": 'best-guess'; expected one of \['model', 'baseline', 'ensemble'\]"),
    ({"serve": None}, r'"serve": None \(NoneType\); expected one of'),
    ({"params": {"truncation": "middle"}}, r"params.truncation = 'middle'; this mailtriage knows \['head', 'head_tail'\]"),
    ({"params": "head"}, r'"params": \'head\'; expected a JSON object'),
    ({"threshold": 2}, r'"threshold": 2.0; expected a finite number in 0..1'),
    ({"base_model": ""}, r'"base_model": \'\'; expected a non-empty string'),
    ({"base_model": 5}, r'"base_model": 5 \(int\); expected a non-empty string'),
    ({"labels": "billing"}, r'"labels": \'billing\' \(str\); expected a list'),
    ({"labels": [1, 2]}, r'"labels": \[1, 2\]; expected a list of non-empty label names'),
    ({"metrics": {"macro_f1": "high"}}, r'"metrics.macro_f1": \'high\'; expected a finite number in 0..1'),
    ({"metrics": {"accuracy": math.nan}}, r'"metrics.accuracy": nan; expected a finite number in 0..1'),
    ({"metrics": [0.9]}, r'"metrics": \[0.9\] \(list\); expected a JSON object'),
    ({"gate": "promoted"}, r'"gate": \'promoted\' \(str\); expected a JSON object'),
    ({"created": 20260101}, r'"created": 20260101 \(int\); expected a UTC time'),
    ({"temperature": "x" * 10_000}, r'"temperature": \'x{70,}\.\.\. \(str\)'),  # cut, not megabytes
    ({"origins": {"daemon": -3}}, r'"origins.daemon": -3; expected a count'),
    ({"origins": {"staff": 1.5}}, r'"origins.staff": 1.5; expected a count'),
    ({"origins": {"corrections": True}}, r'"origins.corrections": True; expected a count'),
    ({"origins": {"auto_filed": "sometimes"}}, r"\"origins.auto_filed\": 'sometimes'; expected one of \['include'"),
    ({"origins": [1, 2]}, r'"origins": \[1, 2\] \(list\); expected a JSON object'),
]


@pytest.mark.parametrize(("data", "message"), HOSTILE, ids=[repr(d)[:40] for d, _ in HOSTILE])
def test_hostile_values_are_refused_naming_key_value_and_range(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    # Through the file, as the loader reads it (json writes NaN/Infinity, which json.loads accepts).
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message) as caught:
        Manifest.load(tmp_path)
    assert str(tmp_path / "manifest.json") in str(caught.value)
    assert "Fix the value" in str(caught.value) or "retrain" in str(caught.value)


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="expected a JSON object"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"temperature": 1' + "0" * 5000 + "}")  # past int's digit limit
    with pytest.raises(ModelError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_building_one_by_hand_is_checked_too() -> None:
    with pytest.raises(ModelError, match="temperature"):
        Manifest(temperature=1e-300)
    with pytest.raises(ModelError, match="ensemble_weight"):
        Manifest(ensemble_weight=math.nan)


_KEYS = ("serve", "temperature", "ensemble_weight", "ensemble_temperature", "baseline_temperature", "threshold",
         "base_model", "mailtext_version", "labels", "created", "version", "metrics", "gate", "params", "training")


def _hostile_values(rng: random.Random) -> Iterator[Any]:
    floats = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 5e-324, 1e300, -1.0, 0.5, 1.0, 2.0, 99.0, 0.0099,
              100.0, 100.01, 1.7976931348623157e308]
    while True:
        yield rng.choice([
            rng.choice(floats), rng.uniform(-1e3, 1e3), 10 ** rng.randint(0, 400), -(10 ** rng.randint(0, 30)),
            rng.choice([True, False, None, "", "abc", "model", "ensemble", "baseline", "head", "head_tail", "1e-3"]),
            [rng.random()], {"truncation": rng.choice(["head", "x", 1, None])}, {"macro_f1": rng.choice(floats)},
            {"params": {"truncation": rng.choice(["head_tail", 3])}}, ["billing", rng.choice(["", 1, "x"])],
        ])


def test_fuzz_hostile_manifests_give_a_sane_manifest_or_a_model_error(tmp_path: Path) -> None:
    rng = random.Random(1234)
    values = _hostile_values(rng)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(3000):
        data = {key: next(values) for key in rng.sample(_KEYS, rng.randint(1, 5))}
        (tmp_path / "manifest.json").write_text(json.dumps(data))
        try:
            m = Manifest.load(tmp_path)
        except ModelError as exc:
            outcomes["refused"] += 1
            assert any(f'"{key}' in str(exc) or f"{key}." in str(exc) for key in (*data, "truncation")), (data, exc)
            continue
        outcomes["loaded"] += 1
        for t in (m.temperature, m.ensemble_temperature, m.baseline_temperature):
            assert isinstance(t, float) and TEMPERATURE_MIN <= t <= TEMPERATURE_MAX
        assert isinstance(m.ensemble_weight, float) and 0.0 <= m.ensemble_weight <= 1.0
        assert m.serve in ("model", "baseline", "ensemble") and m.truncation in ("head", "head_tail")
        assert m.threshold is None or 0.0 <= m.threshold <= 1.0
        assert m.macro_f1 is None or 0.0 <= m.macro_f1 <= 1.0
        assert Manifest.from_dict(m.to_dict()) == m  # what loads also saves and loads again
    assert outcomes["loaded"] > 100 and outcomes["refused"] > 100, outcomes


# ---- the readers: `mailtriage-train list` and `mailtriage stats` ------------------------------------


def _version(model_dir: Path, manifest: dict[str, Any]) -> Path:
    version = modeldir.new_version_dir(model_dir)
    LabelSet(LABELS).save(version)
    modeldir.write_manifest(version, manifest)
    return version


def test_list_shows_a_version_with_a_hostile_manifest_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailtriage_trainer.cli import main

    monkeypatch.delenv("MAILTRIAGE_CONFIG", raising=False)
    monkeypatch.setattr("mailtriage_trainer.cli.DEFAULT_CONFIG", "/nonexistent/mailtriage.toml")
    models = tmp_path / "models"
    origins = {"staff": 40, "corrections": 2, "daemon": 5, "daemon_skipped": 3, "auto_filed": "after_days",
               "auto_filed_days": 7}
    good = _version(models, {"serve": "ensemble", "base_model": "b", "metrics": {"macro_f1": 0.9, "accuracy": 0.8},
                             "gate": {"promoted": True}, "origins": origins})
    bad = _version(models, {"metrics": {"macro_f1": "high", "accuracy": "x"}, "temperature": "abc"})
    old = _version(models, {"base_model": "b"})  # before ensemble serving: it serves the model
    modeldir.promote(models, good)
    capsys.readouterr()
    assert main(["list", "--model-dir", str(models), "--json"]) == 0
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[good.name] == {"version": good.name, "current": True, "macro_f1": 0.9, "accuracy": 0.8,
                               "serve": "ensemble", "gate": "promoted", "base_model": "b", "origins": origins}
    assert rows[bad.name]["macro_f1"] is None and rows[bad.name]["serve"] is None
    assert rows[old.name]["serve"] == "model" and rows[old.name]["gate"] is None
    assert main(["list", "--model-dir", str(models)]) == 0
    table = capsys.readouterr().out
    assert f"* {good.name}" in table and "0.900" in table and "40/2/5 (+3 skipped)" in table


def test_stats_reads_created_from_the_manifest_and_falls_back_on_a_hostile_one(tmp_path: Path) -> None:
    import calendar

    from mailtriage.config import Config, ModelConfig
    from mailtriage.store.stats import model_created_at

    models = tmp_path / "models"
    version = _version(models, {"created": "2026-02-03T04:05:06Z"})
    modeldir.promote(models, version)
    cfg = Config(categories={label: f"Support/{label}" for label in LABELS}, model=ModelConfig(path=str(models)))
    assert model_created_at(cfg) == (version.name, float(calendar.timegm((2026, 2, 3, 4, 5, 6, 0, 0, 0))))
    modeldir.write_manifest(version, {"created": 5, "temperature": math.nan})
    name, created = model_created_at(cfg)
    assert name == version.name and created == float(calendar.timegm(
        __import__("time").strptime(version.name[:15], "%Y%m%d-%H%M%S")))

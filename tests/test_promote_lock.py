"""`mailtriage-train list` / `promote VERSION` (roll back a model), and the model-directory lock
that keeps the timer's retrain, the daemon's retrain and a promote from ever running at once,
shown with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mailtriage.model import modeldir
from mailtriage.testing.builders import write_config
from mailtriage_trainer.cli import EXIT_BUSY, EXIT_ERROR, main
from tests.models import TOY_EXAMPLES
from tests.test_train_cli import toy_message

pytestmark = pytest.mark.component

LABELS = sorted({label for _text, label in TOY_EXAMPLES})
TRAIN = [sys.executable, "-m", "mailtriage_trainer.cli"]


def _version(model_dir: Path, name: str, f1: float, labels: list[str] = LABELS) -> Path:
    """A version directory as the trainer leaves it (labels.json + manifest.json; the weights do
    not matter to list/promote, which never load them)."""
    d = model_dir / name
    d.mkdir(parents=True)
    (d / "labels.json").write_text(json.dumps({"labels": labels}))
    modeldir.write_manifest(d, {"metrics": {"macro_f1": f1, "accuracy": f1 + 0.01}, "serve": "model",
                                "gate": {"promoted": True, "decision": "promoted"}, "base_model": "tiny"})
    return d


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    _version(d, "20260101-000000", 0.81)
    _version(d, "20260108-000000", 0.86)
    modeldir.promote(d, d / "20260108-000000")
    (d / "20260109-000000").mkdir()  # a half-finished training: no labels.json, not a version
    return d


def test_list_and_roll_back(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--model-dir", str(models)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == ["20260101-000000", "*"]
    assert "20260108-000000" in out[2] and "0.860" in out[2] and "20260109" not in "".join(out)

    assert main(["promote", "20260101-000000", "--model-dir", str(models)]) == 0
    assert "current -> 20260101-000000 (was 20260108-000000)" in capsys.readouterr().out
    assert modeldir.current_version(models) == (models / "20260101-000000").resolve()
    assert os.readlink(models / "current") == "20260101-000000"  # relative, as the trainer makes it

    assert main(["list", "--model-dir", str(models), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["current"]) for r in rows] == [("20260101-000000", True), ("20260108-000000", False)]


def test_promote_refuses_unknown_incomplete_paths_and_wrong_labels(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad, why in (("20990101-000000", "no complete model version"), ("20260109-000000", "no complete"),
                     ("../models/20260101-000000", "not a path"), ("current", "not a path")):
        assert main(["promote", bad, "--model-dir", str(models)]) == EXIT_ERROR, bad
        assert why in capsys.readouterr().err, bad
    _version(models, "20260110-000000", 0.9, labels=["billing", "other"])
    cfg = write_config(tmp_path / "config.toml", categories={label: f"Support/{label}" for label in LABELS},
                       training={"model_dir": str(models)})
    assert main(["promote", "20260110-000000", "--config", str(cfg)]) == EXIT_ERROR
    assert "was trained on labels" in capsys.readouterr().err
    assert modeldir.current_version(models) == (models / "20260108-000000").resolve()  # untouched
    assert main(["promote", "20260101-000000", "--config", str(cfg)]) == 0


_HOLDER = """
import sys
from mailtriage.model import modeldir
with modeldir.exclusive(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
print("released", flush=True)
"""


def _hold(model_dir: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(model_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_lock_keeps_two_trainers_apart_and_dies_with_its_holder(models: Path, tmp_path: Path) -> None:
    data = tmp_path / "sorted-mail"
    for i, (text, label) in enumerate(TOY_EXAMPLES):
        (data / label).mkdir(parents=True, exist_ok=True)
        (data / label / f"{i}.eml").write_bytes(toy_message(i, text))
    train = [*TRAIN, "--data", str(data), "--base", str(tmp_path / "unused"), "--model-dir", str(models),
             "--min-examples", "5", "--holdout-fraction", "0.3"]
    holder = _hold(models)  # stands for a retrain in progress (the timer's or the daemon's)
    try:
        for argv in (train, [*TRAIN, "promote", "20260101-000000", "--model-dir", str(models)]):
            busy = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            assert busy.returncode == EXIT_BUSY, busy.stderr[-2000:]
            assert f"pid {holder.pid}" in busy.stderr and "nothing was changed" in busy.stderr
        assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == [
            "20260101-000000", "20260108-000000", "20260109-000000", "current"]  # the trainer made no version
        assert modeldir.current_version(models) == (models / "20260108-000000").resolve()

        # The first holder ends normally: the next one gets the lock.
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
        holder = _hold(models)
        # A holder that is SIGKILLed (OOM, power cut of the process) never leaves a stale lock.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        done = subprocess.run([*TRAIN, "promote", "20260101-000000", "--model-dir", str(models)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert modeldir.current_version(models) == (models / "20260101-000000").resolve()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

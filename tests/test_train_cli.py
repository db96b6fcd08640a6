"""mailtriage-train end to end on tiny models: train, report, gate, promote, refuse, eval --json."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtriage.model import modeldir
from mailtriage.testing.builders import mail
from mailtriage_trainer.cli import EXIT_ERROR, EXIT_NOT_PROMOTED, EXIT_PROMOTED, main
from tests.models import TOY_EXAMPLES

pytestmark = pytest.mark.component

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=timezone.utc)


def toy_message(i: int, text: str) -> bytes:
    subject, _, body = text.partition("\n\n") if text.startswith("Subject: ") else ("", "", text)
    subject = subject.removeprefix("Subject: ") or text.split(",")[0][:40]
    return mail(body or text, subject, sender=f"customer{i}@example.com", message_id=f"<toy-{i}@example.com>",
                date=format_datetime(T0 + timedelta(hours=i)), linesep="\n")


@pytest.fixture
def toy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "sorted-mail"
    for i, (text, label) in enumerate(TOY_EXAMPLES):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.eml").write_bytes(toy_message(i, text))
    return root


def train_args(data: Path, base: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--base", str(base), "--model-dir", str(model_dir), "--device", "cpu",
        "--batch-size", "8", "--lora-r", "8", "--max-length", "64", "--min-examples", "5",
        "--holdout-fraction", "0.3", "--seed", "1", *extra,
    ]


GOOD = ("--epochs", "30", "--learning-rate", "3e-3", "--patience", "40")
BAD = ("--epochs", "1", "--learning-rate", "1e-6")


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MAILTRIAGE_CONFIG", raising=False)
    monkeypatch.setattr("mailtriage_trainer.cli.DEFAULT_CONFIG", "/nonexistent/mailtriage.toml")
    yield


def test_train_promote_then_gate_refuses_a_worse_model_then_eval(
    toy_tree: Path, tiny_encoder_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"

    # 1. first training: nothing is current, so it is promoted
    assert main(train_args(toy_tree, tiny_encoder_base, models, *GOOD)) == EXIT_PROMOTED
    out = capsys.readouterr().out
    assert "PROMOTED" in out and "report:" in out
    first = modeldir.current_version(models)
    assert first is not None
    manifest = modeldir.read_manifest(first)
    assert manifest["labels"] == ["billing", "login", "refunds"]
    assert manifest["base_model"] == str(tiny_encoder_base)
    assert manifest["mailtext_version"]
    assert manifest["data"]["split"].startswith("time-ordered")
    assert manifest["data"]["holdout"]["n"] == 9
    assert manifest["gate"]["promoted"] is True and manifest["gate"]["current_version"] is None
    for key in ("metrics", "model_metrics", "baseline_metrics", "ensemble_metrics"):
        assert {"n", "accuracy", "macro_f1", "per_class", "confusion", "thresholds"} <= set(manifest[key])
    assert manifest["metrics"] == manifest[f"{manifest['serve']}_metrics"]
    good_f1 = manifest["metrics"]["macro_f1"]
    assert good_f1 > 0.6, manifest["metrics"]
    report = (first / "report.md").read_text()
    assert "Promoted to current" in report and "baseline" in report and "0.6" in report
    assert (first / "confusion.png").read_bytes().startswith(b"\x89PNG")
    assert (first / "adapter_config.json").is_file() and (first / "train_keys.txt").is_file()

    # 2. a deliberately undertrained model, served alone: the gate keeps the current one and exits 3
    assert main(train_args(toy_tree, tiny_encoder_base, models, *BAD, "--serve", "model")) == EXIT_NOT_PROMOTED
    out = capsys.readouterr().out
    assert "NOT PROMOTED" in out
    assert modeldir.current_version(models) == first
    refused = sorted(p for p in models.iterdir() if p.is_dir() and not p.is_symlink() and p != first)
    assert len(refused) == 1
    gate = modeldir.read_manifest(refused[0])["gate"]
    assert gate["promoted"] is False and gate["decision"] == "refused"
    assert gate["current_version"] == first.name
    assert gate["current_macro_f1"] == pytest.approx(good_f1)
    assert gate["new_macro_f1"] < good_f1
    assert "Not promoted" in (refused[0] / "report.md").read_text()

    # 3. eval --json: one JSON object on stdout
    assert main(["eval", "--data", str(toy_tree), "--model", str(models), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == len(TOY_EXAMPLES)
    assert {"n", "accuracy", "macro_f1", "per_class"} <= set(result)
    assert set(result["per_class"]) == {"billing", "login", "refunds"}
    assert result["model"] == first.name


def test_ensemble_is_served_and_gated_as_served(
    toy_tree: Path, tiny_encoder_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mailtriage.model.transformers import load_classifier

    models = tmp_path / "models"
    # 1. An undertrained model, its ensemble forced to be served (the real rule keeps the model here:
    # the ensemble only copies the baseline); model and ensemble then score far apart.
    with monkeypatch.context() as patch:
        patch.setattr("mailtriage_trainer.evaluate.choose_serve", lambda *_: "ensemble")
        assert main(train_args(toy_tree, tiny_encoder_base, models, *BAD)) == EXIT_PROMOTED
    assert "serving the ensemble" in capsys.readouterr().out
    first = modeldir.current_version(models)
    assert first is not None
    manifest = modeldir.read_manifest(first)
    assert manifest["serve"] == "ensemble" and (first / "baseline.npz").is_file()
    assert manifest["metrics"] == manifest["ensemble_metrics"]
    served_f1, model_f1 = manifest["metrics"]["macro_f1"], manifest["model_metrics"]["macro_f1"]
    assert served_f1 > model_f1 + 0.3, (served_f1, model_f1)
    report = (first / "report.md").read_text()
    assert "Served: the ensemble" in report and "x baseline) (served)" in report
    assert load_classifier(models, device="cpu").serve == "ensemble"

    # 2. The identical model, now served alone: the gate scores the current version as it is served
    # (its ensemble, through load_classifier), so the new one is refused.
    assert main(train_args(toy_tree, tiny_encoder_base, models, *BAD, "--serve", "model")) == EXIT_NOT_PROMOTED
    assert "serving the model" in capsys.readouterr().out
    second = next(p for p in models.iterdir() if p.is_dir() and not p.is_symlink() and p != first)
    again = modeldir.read_manifest(second)
    assert again["serve"] == "model" and not (second / "baseline.npz").exists()
    assert again["metrics"] == again["model_metrics"]
    assert again["model_metrics"]["macro_f1"] == pytest.approx(model_f1)
    assert again["gate"]["current_macro_f1"] == pytest.approx(served_f1)
    assert again["gate"]["new_macro_f1"] == pytest.approx(model_f1)
    assert "Served: the fine-tuned model alone" in (second / "report.md").read_text()

    # 3. eval --model goes through load_classifier too: it scores the served ensemble, far above the
    # undertrained model alone (about 1/3 accuracy on three balanced classes).
    assert main(["eval", "--data", str(toy_tree), "--model", str(models), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == first.name and result["accuracy"] > 0.8


def test_force_promotes_what_the_gate_refuses(
    toy_tree: Path, tiny_encoder_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    assert main(train_args(toy_tree, tiny_encoder_base, models, *GOOD)) == EXIT_PROMOTED
    first = modeldir.current_version(models)
    # A bigger holdout reaches into mail the current version trained on: the gate leaves that out.
    args = train_args(toy_tree, tiny_encoder_base, models, *BAD, "--serve", "model", "--force")
    args[args.index("--holdout-fraction") + 1] = "0.4"
    assert main(args) == EXIT_PROMOTED
    forced = modeldir.current_version(models)
    assert forced != first
    gate = modeldir.read_manifest(forced)["gate"]
    assert gate["decision"] == "forced" and gate["promoted"] is True
    assert modeldir.read_manifest(forced)["data"]["holdout"]["n"] == 12
    assert gate["compared_on"] == 9
    assert "did not train on" in gate["reason"]
    capsys.readouterr()


def test_errors_exit_2_with_a_message(tmp_path: Path, toy_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path / "nope"), "--base", "x", "--model-dir", str(tmp_path)]) == EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err
    assert main(["--data", str(toy_tree), "--base", str(tmp_path / "no-model"), "--model-dir", str(tmp_path)]) == EXIT_ERROR
    assert "no-model" in capsys.readouterr().err
    code = main(["--data", str(toy_tree), "--base", "x", "--model-dir", str(tmp_path), "--min-examples", "50"])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "fewer than 50 examples" in err and "'billing': 11" in err
    assert not any(tmp_path.glob("2*"))  # no version directory was started


def test_dry_run_harvests_imap_folders_without_marking_seen(
    tmp_path: Path, dovecot, imap, imap_user, capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mailtriage.testing.dovecot import load_messages

    folders = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
    for i, (text, label) in enumerate(TOY_EXAMPLES):
        load_messages(imap, folders[label], toy_message(i, text))
    monkeypatch.setenv("MT_TEST_PASSWORD", imap_user[1])
    config = tmp_path / "config.toml"
    config.write_text(
        "[categories]\n" + "".join(f'{k} = "{v}"\n' for k, v in folders.items())
        + "[[accounts]]\n"
        + f'name = "support"\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = "none"\n'
        + f'username = "{imap_user[0]}"\npassword_env = "MT_TEST_PASSWORD"\n'
        + "[training]\nmin_examples_per_class = 5\n"
    )
    assert main(["--config", str(config), "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labels"] == ["billing", "login", "refunds"]
    assert summary["data"]["all"]["per_class"] == {"billing": 11, "login": 11, "refunds": 11}
    assert summary["data"]["source"] == "imap:support"
    imap.select_folder("Support/Billing", readonly=True)
    assert imap.search(["SEEN"]) == []
    assert os.environ["MT_TEST_PASSWORD"]


def test_auto_serves_the_best_of_three_and_never_below_the_baseline(
    toy_tree: Path, tiny_encoder_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An undertrained model loses to the TF-IDF baseline: the version serves the baseline or the
    ensemble, whichever is best on held-out mail, and load_classifier serves exactly that."""
    from mailtriage.model.ensemble import BaselineClassifier
    from mailtriage.model.transformers import load_classifier

    models = tmp_path / "models"
    assert main(train_args(toy_tree, tiny_encoder_base, models, *BAD, "--target-accuracy", "0.9")) == EXIT_PROMOTED
    assert "target accuracy 90.0%" in capsys.readouterr().out
    version = modeldir.current_version(models)
    assert version is not None
    m = modeldir.read_manifest(version)
    # Calibration and the target-accuracy threshold.
    cal = m["calibration"]
    assert cal["temperature"] == m["temperature"] > 0 and cal["fitted_on"] == m["data"]["validation"]["n"]
    assert {"ece_before", "ece_after"} <= set(cal) and "ece" in m["metrics"]
    # The baseline's own temperature, fitted on the same validation mail, served by load_baseline.
    assert cal["baseline"]["temperature"] == m["baseline_temperature"] > 0
    assert cal["baseline"]["fitted_on"] == cal["fitted_on"]
    assert cal["baseline"]["ece_after"] == pytest.approx(m["baseline_metrics"]["ece"])
    # The ensemble's own temperature (the mix of two calibrated parts is under-confident), same slice.
    assert cal["ensemble"]["temperature"] == m["ensemble_temperature"] > 0
    assert cal["ensemble"]["fitted_on"] == cal["fitted_on"]
    assert cal["ensemble"]["ece_after"] == pytest.approx(m["ensemble_metrics"]["ece"])
    target = m["target"]
    assert target["target_accuracy"] == 0.9 and target["n"] == m["metrics"]["n"]
    assert not target["reached"] or target["accuracy_on_covered"] >= 0.9
    report_text = (version / "report.md").read_text()
    assert "## Calibration" in report_text and "Target accuracy 90.0%" in report_text
    assert "The TF-IDF baseline's confidences have their own temperature" in report_text
    scores = {k: m[f"{k}_metrics"]["macro_f1"] for k in ("model", "baseline", "ensemble")}
    assert m["serve"] != "model" and scores[m["serve"]] == max(scores.values())
    assert m["metrics"]["macro_f1"] >= m["baseline_metrics"]["macro_f1"]
    assert 0.0 < m["ensemble_weight"] < 1.0
    assert "because it has the best held-out macro-F1" in m["serve_reason"]
    assert m["serve_reason"] in (version / "report.md").read_text()
    clf = load_classifier(models, device="cpu")
    assert clf.serve == m["serve"]
    if m["serve"] == "baseline":
        assert isinstance(clf, BaselineClassifier)
    # eval --model scores what is served: the same held-out-grade accuracy, not the broken model's.
    assert main(["eval", "--data", str(toy_tree), "--model", str(models), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.8


def test_refit_all_retrains_the_served_parts_on_all_mail_after_the_gate(
    toy_tree: Path, tiny_encoder_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    args = train_args(toy_tree, tiny_encoder_base, models, *BAD, "--serve", "ensemble", "--refit-all")
    assert main(args) == EXIT_PROMOTED
    capsys.readouterr()
    version = modeldir.current_version(models)
    assert version is not None
    m = modeldir.read_manifest(version)
    assert m["refit"]["parts"] == ["model", "baseline"]
    assert m["refit"]["examples"] == m["data"]["all"]["n"]
    assert not (version / ".refit").exists()
    assert (version / "adapter_config.json").is_file() and (version / "baseline.npz").is_file()
    from mailtriage.model.ensemble import load_baseline

    # The refitted baseline has seen the holdout too: it now classifies every toy message right.
    texts = [t for t, _ in TOY_EXAMPLES]
    pred = load_baseline(version, m["labels"]).predict(texts)
    assert list(pred) == [label for _, label in TOY_EXAMPLES]
    assert "retrained on all" in (version / "report.md").read_text()
    # Without --refit-all nothing is refitted.
    assert main(train_args(toy_tree, tiny_encoder_base, models, *BAD, "--serve", "model", "--force")) == EXIT_PROMOTED
    capsys.readouterr()
    assert "refit" not in modeldir.read_manifest(modeldir.current_version(models))

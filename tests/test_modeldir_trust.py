"""What a model directory can do to the process that loads it: nothing but supply numbers.

No pickle is ever loaded (the TF-IDF baseline is a pickle-free .npz; an old pickled baseline.joblib
is refused unread, in the loader, the daemon's backend and `mailtriage classify`), ``current`` may
only point at a version inside MODEL_DIR, and what the trainer writes is 0700/0600 with umask 0.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mailtriage.core.labels import LabelSet
from mailtriage.errors import ModelError
from mailtriage.model import ensemble, modeldir
from tests.models import TOY_EXAMPLES, TOY_LABELS, toy_dataset, toy_params

TEXTS = [t for t, _ in TOY_EXAMPLES] + ["", "hello", "Rechnung! 💶 refund?", "invoice " * 300, "zzzz qqqq"]


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: the attack on baseline.joblib."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    import joblib

    joblib.dump(_Payload(marker), path)


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ---- the baseline file: identical predictions, no pickle --------------------------------------------


def _fitted(labels: tuple[str, ...], **tfidf: object) -> object:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    rows = [(t, y) for t, y in toy_dataset()[0] if y in labels]
    parts = [("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, **tfidf))]  # type: ignore[arg-type]
    parts.append(("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)))
    pipeline = Pipeline([("features", FeatureUnion(parts)),
                         ("clf", LogisticRegression(C=30.0, solver="saga", max_iter=50, tol=1e-3, random_state=0))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a loose fit, as the trainer's
        return pipeline.fit([t for t, _ in rows], [y for _, y in rows])


@pytest.mark.pure
@pytest.mark.parametrize("case", ["trainer", "two-classes", "max-features"])
def test_saved_baseline_predicts_what_the_fitted_pipeline_did(tmp_path: Path, case: str) -> None:
    from sklearn.exceptions import ConvergenceWarning

    from mailtriage_trainer.evaluate import Baseline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if case == "trainer":  # exactly what mailtriage-train fits and saves
            train = toy_dataset()[0]
            base = Baseline(TOY_LABELS).fit([t for t, _ in train], [y for _, y in train])
            pipeline, labels = base._pipeline, TOY_LABELS
            base.save(tmp_path)
        else:
            labels = TOY_LABELS[:2] if case == "two-classes" else TOY_LABELS
            # max_features prunes the vocabulary, which leaves numpy integers in vocabulary_
            pipeline = _fitted(labels, **({"max_features": 40} if case == "max-features" else {}))
            ensemble.save_baseline(pipeline, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline.npz"]
    loaded = ensemble.load_baseline(tmp_path, labels, temperature=1.0)
    want, got = pipeline.predict_proba(TEXTS), loaded.predict_proba(TEXTS)  # type: ignore[attr-defined]
    assert list(loaded.classes_) == list(pipeline.classes_)  # type: ignore[attr-defined]
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-12
    assert list(loaded.predict(TEXTS)) == list(pipeline.predict(TEXTS))  # type: ignore[attr-defined]
    # The file is plain arrays: numpy reads every entry with pickles forbidden.
    with np.load(tmp_path / "baseline.npz", allow_pickle=False) as npz:
        assert all(npz[name].dtype != object for name in npz.files)


@pytest.mark.pure
def test_a_pickle_inside_the_npz_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "baseline.npz", spec=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(ModelError, match="baseline.npz.*not a usable TF-IDF baseline.*retrain"):
        ensemble.load_baseline(tmp_path, TOY_LABELS)
    assert not marker.exists()


@pytest.mark.pure
def test_an_npz_with_forged_settings_is_refused(tmp_path: Path) -> None:
    import json

    pipeline = _fitted(TOY_LABELS)
    ensemble.save_baseline(pipeline, tmp_path)
    with np.load(tmp_path / "baseline.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    spec = json.loads(arrays["spec"].tobytes())
    for forge, why in ((lambda s: s["parts"][0]["settings"].update(analyzer="callable"), "analyzer"),
                       (lambda s: s["parts"][0]["settings"].update(preprocessor="os.system"), "settings"),
                       (lambda s: s["parts"][0]["vocabulary"].pop(), "idf weights"),
                       (lambda s: s.update(classes=["billing", "billing", "x"]), "classes")):
        forged = json.loads(json.dumps(spec))
        forge(forged)
        payload = np.frombuffer(json.dumps(forged).encode(), dtype=np.uint8)
        np.savez(tmp_path / "baseline.npz", **{**arrays, "spec": payload})
        with pytest.raises(ModelError, match=why):
            ensemble.load_baseline(tmp_path, TOY_LABELS)


# ---- an old pickled baseline is refused unread, wherever a version is loaded --------------------------


def _version(tiny_model_dir: Path, dest: Path, serve: str) -> Path:
    version = dest / "models" / "20260101-000000"
    shutil.copytree(modeldir.resolve(tiny_model_dir), version)
    manifest = modeldir.read_manifest(version)
    manifest["serve"] = serve
    modeldir.write_manifest(version, manifest)
    return version


@pytest.mark.component
@pytest.mark.parametrize("serve", ["baseline", "ensemble"])
def test_a_pickled_baseline_joblib_never_runs(tiny_model_dir: Path, tmp_path: Path, serve: str) -> None:
    import joblib

    from mailtriage.config import Config, ModelConfig
    from mailtriage.model import backend
    from mailtriage.model.transformers import load_classifier

    # The payload is live: unpickling it does create its marker.
    _plant_pickle(tmp_path / "control.joblib", tmp_path / "control-ran")
    joblib.load(tmp_path / "control.joblib")
    assert (tmp_path / "control-ran").exists()

    version = _version(tiny_model_dir, tmp_path, serve)
    marker = tmp_path / "pwned"
    _plant_pickle(version / "baseline.joblib", marker)
    refused = r"baseline.joblib, a Python pickle.*can run any code.*Retrain with mailtriage-train"
    with pytest.raises(ModelError, match=refused):
        load_classifier(version, device="cpu")
    # The daemon's loader (start-up and hot reload), through MODEL_DIR/current.
    modeldir.promote(version.parent, version)
    cfg = Config(categories={label: f"Support/{label}" for label in TOY_LABELS},
                 model=ModelConfig(path=str(version.parent), device="cpu"))
    with pytest.raises(ModelError, match=refused):
        backend.load(cfg, backend.target(cfg))
    # `mailtriage classify --model`, a separate process, as an admin would run it.
    mail = tmp_path / "m.eml"
    mail.write_bytes(b"Subject: refund\n\nplease refund my order\n")
    env = {k: v for k, v in os.environ.items() if k != "MAILTRIAGE_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "mailtriage.cli.main", "classify", "--model", str(version.parent),
                           "--device", "cpu", str(mail)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode != 0 and "a Python pickle" in done.stderr, done.stderr[-2000:]
    assert not marker.exists(), "the pickled baseline ran"

    # Next to a real baseline.npz the old file is ignored, not read.
    train = toy_dataset()[0]
    from mailtriage_trainer.evaluate import Baseline

    Baseline(TOY_LABELS).fit([t for t, _ in train], [y for _, y in train]).save(version)
    clf = load_classifier(version, device="cpu")
    assert clf.serve == serve and len(clf.classify(["refund please"])) == 1
    assert not marker.exists()


# ---- current stays inside MODEL_DIR -------------------------------------------------------------------


def _labelled(path: Path) -> Path:
    path.mkdir(parents=True)
    LabelSet(TOY_LABELS).save(path)
    return path


@pytest.mark.pure
@pytest.mark.parametrize("how", ["absolute", "relative", "via-a-linked-version"])
def test_current_pointing_outside_model_dir_is_refused(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    inside = _labelled(models / "20260101-000000")
    outside = _labelled(tmp_path / "elsewhere" / "evil")
    link = models / modeldir.CURRENT
    if how == "absolute":
        link.symlink_to(outside, target_is_directory=True)
    elif how == "relative":
        link.symlink_to(Path("..") / "elsewhere" / "evil", target_is_directory=True)
    else:  # current -> a version name that is itself a link out of MODEL_DIR
        (models / "20260102-000000").symlink_to(outside, target_is_directory=True)
        link.symlink_to("20260102-000000", target_is_directory=True)
    for given in (models, link):
        with pytest.raises(ModelError, match=r"outside the model directory.*mailtriage-train promote"):
            modeldir.resolve(given)
    with pytest.raises(ModelError, match="outside the model directory"):
        modeldir.current_version(models)
    # A version named directly is the admin's explicit choice.
    assert modeldir.resolve(outside) == outside.resolve()
    # `list` still shows what can be promoted, and `promote` repairs the link.
    from mailtriage_trainer.cli import main

    monkeypatch.delenv("MAILTRIAGE_CONFIG", raising=False)
    monkeypatch.setattr("mailtriage_trainer.cli.DEFAULT_CONFIG", "/nonexistent/mailtriage.toml")
    assert main(["list", "--model-dir", str(models)]) == 0
    out, err = capsys.readouterr()
    assert inside.name in out and "outside the model directory" in err
    assert main(["promote", inside.name, "--model-dir", str(models)]) == 0
    assert "a link outside" in capsys.readouterr().out
    assert modeldir.resolve(models) == modeldir.resolve(link) == inside.resolve()


# ---- private files whatever the umask -------------------------------------------------------------------


def _modes(top: Path) -> dict[str, str]:
    out = {}
    for path in [top, *top.rglob("*")]:
        st = path.lstat()
        if not stat.S_ISLNK(st.st_mode) and path.name != modeldir.LOCK_FILE:
            out[str(path.relative_to(top.parent))] = oct(stat.S_IMODE(st.st_mode))
    return out


@pytest.mark.component
def test_a_trained_version_is_private_with_umask_0(tiny_encoder_base: Path, tmp_path: Path, umask0: None) -> None:
    from mailtriage_trainer.evaluate import Baseline
    from mailtriage_trainer.finetune import finetune

    models = tmp_path / "models"
    train, val = toy_dataset()
    with modeldir.exclusive(models):
        version = modeldir.new_version_dir(models)
        finetune(tiny_encoder_base, train, val, LabelSet(TOY_LABELS), version, toy_params(epochs=1), progress=False)  # type: ignore[arg-type]
        Baseline(TOY_LABELS).fit([t for t, _ in train], [y for _, y in train]).save(version)
        (version / "report.md").write_text("written with the umask, as the report is")
        during = _modes(version)
    refused = modeldir.new_version_dir(models)  # a version that is never promoted
    LabelSet(TOY_LABELS).save(refused)
    modeldir.write_manifest(refused, {"serve": "model"})
    ensemble.save_baseline(_fitted(TOY_LABELS), refused)
    # The version folder is private from its creation, before anything is written into it.
    assert during[version.name] == oct(0o700)
    assert oct(stat.S_IMODE((models / modeldir.LOCK_FILE).stat().st_mode)) == oct(0o600)
    assert oct(stat.S_IMODE(models.stat().st_mode)) == oct(0o700)
    modes = _modes(version)
    assert {"adapter_model.safetensors", "manifest.json", "baseline.npz", "labels.json", "report.md"} <= {
        Path(p).name for p in modes}
    want = {p: oct(0o700 if (tmp_path / "models" / p).is_dir() else 0o600) for p in modes}
    assert modes == want
    # What mailtriage writes itself is 0600 at once, lock or no lock.
    assert set(_modes(refused).values()) == {oct(0o700), oct(0o600)}
    (refused / "notes.txt").write_text("dropped in by hand")
    modeldir.promote(models, refused)  # promoting makes the whole version private
    assert set(_modes(refused).values()) == {oct(0o700), oct(0o600)}

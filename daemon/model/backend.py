"""Which Classifier the config asks for: the local model directory or an external inference server.

``target(config)`` is what the service watches for hot reloads (the resolved version directory, or a
fixed marker for a remote server, which never changes); ``load(config, target)`` builds the classifier.
torch is imported only when the local backend is actually loaded.
"""

from __future__ import annotations

from pathlib import Path

from mailtriage.config import Config
from mailtriage.core.classifier import Classifier
from mailtriage.model import modeldir

_HTTP_MARKER = "http-backend:"


def target(config: Config) -> Path:
    """The local version directory now promoted, or a constant marker when backend = "http"."""
    if config.model.backend == "http":
        return Path(_HTTP_MARKER + (config.model.url or ""))
    return modeldir.resolve(Path(config.model.path))


def load(config: Config, path: Path | None = None, *, probe: bool = True) -> Classifier:
    """The configured classifier. For "http", ``probe`` classifies one text now, so a server that is
    down or serves another label set fails at start-up (and in `mailtriage check`), not on the first mail."""
    m = config.model
    if m.backend == "http":
        from mailtriage.model.remote import HttpClassifier

        assert m.url is not None  # validated by ModelConfig
        clf = HttpClassifier(
            m.url, config.labels, api=m.api, remote_model=m.remote_model, timeout=m.timeout, batch_size=m.batch_size
        )
        if probe:
            clf.classify(["mailtriage start-up probe"])
        return clf
    from mailtriage.model.transformers import load_classifier

    return load_classifier(
        path if path is not None else m.path,
        device=m.device,
        batch_size=m.batch_size,
        max_length=m.max_length,
        expected_labels=config.labels,
        quantize=m.quantize,
        threads=m.threads,
        runtime=m.runtime,
        compile=m.compile,
    )


__all__ = ["load", "target"]

"""Stand-ins for the model in tests, the demo and the benchmarks: pure logic, no torch.

A fake is for pure logic under test (batching, routing, thread hand-off), never for the protocol
behaviour we promise; the real tiny models live in ``tests/models.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mailtriage.core.classifier import Prediction

SUPPORT_KEYWORDS = {"invoice": "billing", "password": "login", "refund": "refunds"}


class KeywordClassifier:
    """A ``Classifier`` by keyword rules: the first keyword found in a text gives its label at
    ``hit`` confidence; no keyword gives ``default`` (the first label) at ``miss``. The other
    labels share the rest of the probability mass evenly.

    Calling the object is the ``(texts) -> (predictions, version)`` function a watcher takes;
    ``batches`` records the size of every batch it was given.
    """

    def __init__(
        self,
        labels: Sequence[str],
        keywords: Mapping[str, str] = SUPPORT_KEYWORDS,
        *,
        version: str = "kw-1",
        hit: float = 0.95,
        miss: float = 0.4,
        default: str | None = None,
    ) -> None:
        self.labels = tuple(labels)
        self.keywords = dict(keywords)
        self.version = version
        self.hit, self.miss = hit, miss
        self.default = default if default is not None else self.labels[0]
        unknown = {lab for lab in (*self.keywords.values(), self.default) if lab not in self.labels}
        if unknown:
            raise ValueError(f"keyword labels {sorted(unknown)} are not in the label set {list(self.labels)}")
        self.batches: list[int] = []

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        self.batches.append(len(texts))
        rest = max(len(self.labels) - 1, 1)
        out = []
        for text in texts:
            found = next((lab for word, lab in self.keywords.items() if word in text.lower()), None)
            conf = self.hit if found else self.miss
            label = found or self.default
            scores = {lab: (conf if lab == label else (1 - conf) / rest) for lab in self.labels}
            out.append(Prediction(label, conf, scores))
        return out

    def __call__(self, texts: Sequence[str]) -> tuple[list[Prediction], str]:
        return self.classify(texts), self.version

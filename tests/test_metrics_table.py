"""The scores the gate and the report use, checked on many random tables against exact arithmetic.

metrics() and ood_auroc() are scikit-learn's; these tables pin what they must give: counts and
accuracy exact, precision / recall / F1 the correctly rounded fractions of the counts, macro-F1
the mean over the labels that occur, AUROC the Mann-Whitney pair count with ties as 1/2.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from mailtriage_trainer.evaluate import metrics, ood_auroc

pytestmark = pytest.mark.pure


def _table(rng: np.random.Generator) -> tuple[list[str], list[str], list[str]]:
    k = int(rng.integers(2, 30))
    labels = [f"c{i:02d}" for i in range(k)][:: int(rng.choice([1, -1]))]
    n = int(rng.choice([1, 2, 7, 60, 400]))
    yt = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, float(rng.choice([0.1, 1.0, 10.0])))))
    yp = np.where(rng.random(n) < rng.random(), yt, rng.integers(0, k, size=n))
    return labels, [labels[i] for i in yt], [labels[i] for i in yp]


def _ratio(num: int, den: int) -> float:
    return float(Fraction(num, den)) if den else 0.0


@pytest.mark.parametrize("seed", range(8))
def test_metrics_on_random_tables_match_exact_arithmetic(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        labels, y_true, y_pred = _table(rng)
        got = metrics(y_true, y_pred, labels)
        counts = np.zeros((len(labels), len(labels)), dtype=int)
        for t, p in zip(y_true, y_pred, strict=True):
            counts[labels.index(t), labels.index(p)] += 1
        assert got["confusion"] == counts.tolist()
        assert got["accuracy"] == _ratio(int(np.trace(counts)), len(y_true))
        f1s = []
        for i, label in enumerate(labels):
            tp, support, predicted = int(counts[i, i]), int(counts[i].sum()), int(counts[:, i].sum())
            pc = got["per_class"][label]
            assert (pc["precision"], pc["recall"], pc["support"]) == (_ratio(tp, predicted), _ratio(tp, support), support)
            assert pc["f1"] == _ratio(2 * tp, support + predicted)
            if support or predicted:
                f1s.append(pc["f1"])
        assert got["macro_f1"] == pytest.approx(float(np.mean(f1s)), abs=1e-12)


def test_metrics_of_nothing_are_zero() -> None:
    got = metrics([], [], ["a", "b"])
    assert (got["n"], got["accuracy"], got["macro_f1"], got["confusion"]) == (0, 0.0, 0.0, [[0, 0], [0, 0]])
    assert got["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


@pytest.mark.parametrize("seed", range(4))
def test_ood_auroc_on_random_scores_is_the_pair_count_with_ties_as_half(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(25):
        digits = int(rng.choice([1, 2, 6]))  # coarse rounding makes many ties
        a = np.round(rng.beta(5, 2, int(rng.integers(1, 200))), digits)
        b = np.round(rng.beta(2, 3, int(rng.integers(1, 200))), digits)
        wins = sum(Fraction(int((x > b).sum())) + Fraction(int((x == b).sum()), 2) for x in a)
        assert ood_auroc(a.tolist(), b.tolist()) == pytest.approx(float(wins / (len(a) * len(b))), abs=1e-12)

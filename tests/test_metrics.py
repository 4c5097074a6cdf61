"""Metrics against sklearn and lifelines on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lifelines.utils import concordance_index as lifelines_cindex
from lifelines.utils.concordance import _concordance_summary_statistics
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.metrics import confusion_matrix as sk_confusion

from umeml.metrics import (
    NoComparablePairsError,
    auc_macro_ovr,
    auc_micro,
    balanced_accuracy,
    binary_auc,
    bootstrap_ci,
    classification_metrics,
    comparable_pairs,
    concordance_index,
    confusion_matrix,
    survival_metrics,
)


def probs_case(n=120, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    p[np.arange(n), y] += 0.4
    p = np.round(p / p.sum(1, keepdims=True), 2)  # rounding creates ties
    p = p / p.sum(1, keepdims=True)
    return y, p


def test_binary_auc_with_ties_matches_sklearn():
    y = np.array([0, 0, 1, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.1, 0.3, 0.9])
    assert binary_auc(y == 1, s) == pytest.approx(roc_auc_score(y, s))
    with pytest.raises(ValueError):
        binary_auc(np.ones(3, bool), np.arange(3))


def test_classification_against_sklearn():
    y, p = probs_case()
    pred = p.argmax(1)
    value, n_classes = auc_macro_ovr(y, p)
    assert n_classes == 4
    assert value == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert auc_micro(y, p) == pytest.approx(roc_auc_score(np.eye(4)[y], p, average="micro"))
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert (confusion_matrix(y, pred, 4) == sk_confusion(y, pred, labels=range(4))).all()


def test_macro_auc_skips_classes_absent_from_labels():
    y, p = probs_case(k=4)
    keep = y != 3  # class 3 absent from the evaluated patients
    y, p = y[keep], p[keep]
    value, n_classes = auc_macro_ovr(y, p)
    assert n_classes == 3
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in range(3)])
    assert value == pytest.approx(expected)
    with pytest.raises(ValueError):
        auc_macro_ovr(np.zeros(5, int), np.full((5, 2), 0.5))


def test_classification_metrics_dict():
    y, p = probs_case()
    y = y.copy()
    y[:5] = -1  # unknown labels are dropped
    m = classification_metrics(y, p, n_boot=200, seed=1)
    json.dumps(m)  # JSON-serialisable
    for key in ("accuracy", "balanced_accuracy", "auc_macro", "auc_micro"):
        e = m[key]
        assert e["n"] == 115 and e["n_boot"] == 200 and e["n_boot_used"] == 200
        assert e["ci_low"] <= e["value"] <= e["ci_high"]
    assert m["accuracy"]["value"] == pytest.approx((p[5:].argmax(1) == y[5:]).mean())
    assert m["confusion_matrix"]["n"] == 115
    assert np.sum(m["confusion_matrix"]["value"]) == 115
    # seeded: same seed, same CI
    assert classification_metrics(y, p, n_boot=200, seed=1) == m


def test_classification_one_class_reports_undefined_auc():
    m = classification_metrics(np.zeros(6, int), np.tile([0.7, 0.3], (6, 1)), n_boot=20)
    assert m["accuracy"]["value"] == 1.0
    assert m["auc_macro"]["value"] is None and "error" in m["auc_macro"]
    with pytest.raises(ValueError):
        classification_metrics(np.full(3, -1), np.full((3, 2), 0.5))


def test_bootstrap_skips_degenerate_resamples():
    y = np.array([0] * 9 + [1])  # most resamples of 10 lose the single positive sometimes
    s = np.linspace(0, 1, 10)
    e = bootstrap_ci(lambda a, b: binary_auc(a == 1, b), [y, s], n_boot=300, seed=0)
    assert e["value"] == 1.0
    assert 0 < e["n_boot_used"] < 300
    assert e["n"] == 10


def survival_case(n=60, seed=0):
    rng = np.random.default_rng(seed)
    t = np.round(rng.exponential(20, n))  # rounding creates tied times
    c = rng.integers(0, 2, n)
    r = rng.normal(size=n)
    return t, c, r


def test_cindex_matches_lifelines_with_sign_handled():
    t, c, r = survival_case()
    expected = lifelines_cindex(t, -r, 1 - c)
    assert concordance_index(t, c, r) == pytest.approx(expected)
    assert concordance_index(t, None, r, events=1 - c) == pytest.approx(expected)


def test_cindex_sign_perfect_risk_gives_one():
    t = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    c = np.zeros(5, int)  # all deaths observed
    risk = -t  # earlier death = higher risk
    assert concordance_index(t, c, risk) == 1.0
    assert concordance_index(t, c, -risk) == 0.0


def test_comparable_pairs_match_lifelines():
    for seed in range(3):
        t, c, r = survival_case(seed=seed)
        e = (1 - c).astype(bool)
        assert comparable_pairs(t, c) == _concordance_summary_statistics(t, -r, e)[2]
    # hand case: deaths at 1 and 3; censored at 3 and 5
    t = np.array([1.0, 3.0, 3.0, 5.0])
    c = np.array([0, 0, 1, 1])
    # death@1 vs all 3 later; death@3 vs censored@3 (same time) and censored@5
    assert comparable_pairs(t, c) == 5


def test_no_comparable_pairs_error():
    t = np.array([5.0, 6.0, 7.0])
    with pytest.raises(NoComparablePairsError, match="no comparable pair"):
        concordance_index(t, np.ones(3, int), np.arange(3.0))  # everyone censored
    with pytest.raises(ValueError):  # NoComparablePairsError is a ValueError
        survival_metrics(t, np.ones(3, int), np.arange(3.0), n_boot=10)
    with pytest.raises(TypeError):
        comparable_pairs(t, np.ones(3), events=np.zeros(3))


def test_survival_metrics_dict():
    t, c, r = survival_case()
    r = r - 0.05 * t  # some signal
    m = survival_metrics(t, c, r, n_boot=100, seed=3)
    json.dumps(m)
    e = m["c_index"]
    assert e["value"] == pytest.approx(lifelines_cindex(t, -r, 1 - c))
    assert e["n"] == 60 and e["pairs"] == comparable_pairs(t, c) and e["events"] == int((1 - c).sum())
    assert e["ci_low"] <= e["value"] <= e["ci_high"]
    assert e["n_boot_used"] <= 100
    assert survival_metrics(t, c, r, n_boot=100, seed=3) == m

"""Classification metrics for grading and subtyping (design section 6).

AUCs use the rank (Mann-Whitney) form, with ties counted 1/2: identical to
``sklearn.metrics.roc_auc_score`` and fast enough to bootstrap. Macro one-vs-rest AUC averages
the per-class AUCs over the classes that occur in ``y_true`` (a class absent from the evaluated
patients has no positive, so its AUC is undefined: it is skipped, and ``n_classes`` in the result
says how many classes entered the average). Micro AUC pools every (patient, class) pair of the
one-hot labels against the probabilities, over all columns of ``probs``. Labels equal to -1
(unknown) are dropped before anything is computed.
"""

from __future__ import annotations

import numpy as np

from umeml.metrics.bootstrap import bootstrap_ci, metric_entry, resample_indices

__all__ = [
    "accuracy",
    "auc_macro_ovr",
    "auc_micro",
    "balanced_accuracy",
    "binary_auc",
    "classification_metrics",
    "confusion_matrix",
    "roc_curve",
]


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for boolean labels ``positive``; ValueError if one class is missing."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC is undefined: the labels hold only one class")
    from scipy.stats import rankdata  # here, not at import: scipy.stats costs the ClientApp 0.5 s

    ranks = rankdata(score)  # average ranks: a tie counts 1/2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1).

    Tied scores move both rates at once (a diagonal step), so the trapezoidal area under the
    points equals :func:`binary_auc`. Needs at least one positive and one negative.
    """
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=float)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs positives and negatives (got {n_pos} and {n_neg})")
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        raise ValueError("accuracy of an empty set")
    return float((y_true == y_pred).mean())


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (as sklearn's balanced accuracy)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    if classes.size == 0:
        raise ValueError("balanced accuracy of an empty set")
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes]))


def auc_macro_ovr(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Macro one-vs-rest AUC and the number of classes averaged (those present in ``y_true``).

    ValueError when fewer than two classes are present.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    classes = [c for c in np.unique(y_true) if 0 <= c < probs.shape[1]]
    if len(classes) < 2:
        raise ValueError("macro AUC is undefined: fewer than two classes among the labels")
    return float(np.mean([binary_auc(y_true == c, probs[:, c]) for c in classes])), len(classes)


def auc_micro(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Micro AUC: one-hot labels against probabilities, all classes pooled."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    onehot = np.zeros_like(probs, dtype=bool)
    onehot[np.arange(len(y_true)), y_true] = True
    return binary_auc(onehot.ravel(), probs.ravel())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; row = true class, column = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _check(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be (n, n_classes) with n = {y_true.shape[0]}, got {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    if (y_true >= probs.shape[1]).any() or (y_true < -1).any():
        raise ValueError(f"labels must be -1 (unknown) or in [0, {probs.shape[1]})")
    keep = y_true >= 0
    return y_true[keep], probs[keep]


def classification_metrics(y_true, probs, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy, macro/micro AUC (with bootstrap 95% CIs) and the confusion
    matrix, JSON-ready: ``{"accuracy": {"value", "ci_low", "ci_high", "n", "n_boot",
    "n_boot_used"}, ..., "confusion_matrix": {"value": [[...]], "n"}}``.

    Patients with label -1 are excluded (``n`` counts the others). An AUC that is undefined on
    the evaluated patients has ``value`` None and an ``error`` string. ValueError if no patient
    has a label.
    """
    y, p = _check(y_true, probs)
    n = len(y)
    if n == 0:
        raise ValueError("no patient with a known label to evaluate")
    pred = p.argmax(axis=1)
    idx = resample_indices(n, n_boot, seed)
    out = {
        "accuracy": bootstrap_ci(accuracy, [y, pred], indices=idx),
        "balanced_accuracy": bootstrap_ci(balanced_accuracy, [y, pred], indices=idx),
    }
    try:
        value, n_classes = auc_macro_ovr(y, p)
        out["auc_macro"] = bootstrap_ci(lambda a, b: auc_macro_ovr(a, b)[0], [y, p], indices=idx, value=value)
        out["auc_macro"]["n_classes"] = n_classes
    except ValueError as err:
        out["auc_macro"] = metric_entry(None, n, error=str(err))
    try:
        value = auc_micro(y, p)
        out["auc_micro"] = bootstrap_ci(auc_micro, [y, p], indices=idx, value=value)
    except ValueError as err:
        out["auc_micro"] = metric_entry(None, n, error=str(err))
    out["confusion_matrix"] = {"value": confusion_matrix(y, pred, p.shape[1]).tolist(), "n": n}
    return out

"""Turn an evaluation pass's predictions into metrics with confidence intervals."""

from __future__ import annotations

import numpy as np

from umeml.metrics import classification_metrics, survival_metrics
from umeml.rundir import PRIMARY_METRICS
from umeml.train.loop import Predictions

PRIMARY = dict(PRIMARY_METRICS)  # task -> the metric models are selected by


def evaluate_predictions(preds: Predictions, tasks, n_boot: int, seed: int) -> dict:
    """Metrics of every task: ``{task: {metric: {value, ci_low, ci_high, n}}}``.

    A task whose metrics cannot be computed on these patients (one class only, no comparable
    pair) reports ``{"error": reason, "n": n}`` instead of failing the whole evaluation.
    """
    out: dict = {}
    for task in tasks:
        try:
            if task == "survival":
                out[task] = survival_metrics(preds.times, preds.censorship, preds.risk, n_boot=n_boot, seed=seed)
            else:
                out[task] = classification_metrics(preds.targets[task], preds.probs[task], n_boot=n_boot, seed=seed)
        except ValueError as err:
            out[task] = {"error": str(err), "n": int(len(preds))}
    return out


def selection_score(metrics: dict, loss: float, min_events: int = 0) -> float:
    """Model-selection score: mean primary metric over tasks (minus loss when none is defined).

    A c-index on fewer than ``min_events`` observed deaths is left out (on a tiny validation
    split a few comparable pairs would pick the epoch); with no metric left, minus the loss.
    """
    values = []
    for task, m in metrics.items():
        entry = m.get(PRIMARY.get(task, ""), {})
        if isinstance(entry, dict) and entry.get("events", min_events) < min_events:
            continue
        value = entry.get("value") if isinstance(entry, dict) else None
        if value is not None and np.isfinite(value):
            values.append(float(value))
    return float(np.mean(values)) if values else -float(loss)

"""Percentile bootstrap confidence intervals over patients (and, for metrics combined over sites,
over sites), seeded and reproducible.

A resample on which the statistic is undefined (one class only, no comparable pair, ...) is
skipped, not counted as a failure of the whole metric; the result says how many resamples were
used (``n_boot_used``) next to how many were drawn (``n_boot``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "metric_entry", "resample_indices", "site_bootstrap_ci"]


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement; the same seed gives the same resamples."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n)) if n > 0 else np.zeros((n_boot, 0), dtype=np.int64)


def metric_entry(value: float | None, n: int, **extra) -> dict:
    """A JSON-ready metric result ``{"value", "ci_low", "ci_high", "n", ...}`` (CI left None)."""
    entry = {"value": _float(value), "ci_low": None, "ci_high": None, "n": int(n)}
    entry.update(extra)
    return entry


def _float(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def bootstrap_ci(
    stat: Callable[..., float],
    arrays: Sequence[np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    indices: np.ndarray | None = None,
    value: float | None = None,
) -> dict:
    """Point estimate and percentile CI of ``stat(*arrays)`` over patient resamples.

    Args:
        stat: statistic of the (resampled) arrays; may raise ``ValueError`` or
            ``ZeroDivisionError`` or return a non-finite number when undefined.
        arrays: per-patient arrays, all of the same length n (resampled together).
        n_boot: number of resamples (0: no CI).
        seed: seed of the resampling (ignored when ``indices`` is given).
        level: confidence level (0.95 -> 2.5th and 97.5th percentiles).
        indices: precomputed (n_boot, n) resamples, to share them across metrics.
        value: the point estimate if already computed (otherwise ``stat(*arrays)``).

    Returns ``{"value", "ci_low", "ci_high", "n", "n_boot", "n_boot_used"}``; the CI bounds are
    None when no resample gave a finite value.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci: arrays must have the same length")
    if value is None:
        value = stat(*arrays)
    if indices is None:
        indices = resample_indices(n, n_boot, seed)
    samples = []
    for idx in indices:
        try:
            v = float(stat(*(a[idx] for a in arrays)))
        except (ValueError, ZeroDivisionError):
            continue
        if math.isfinite(v):
            samples.append(v)
    entry = metric_entry(value, n, n_boot=int(len(indices)), n_boot_used=len(samples))
    if samples:
        tail = 100.0 * (1.0 - level) / 2.0
        lo, hi = np.percentile(samples, [tail, 100.0 - tail])
        entry["ci_low"], entry["ci_high"] = float(lo), float(hi)
    return entry


def site_bootstrap_ci(values: Sequence[float], weights: Sequence[float], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Percentile CI of a weighted mean of per-site values when the **sites** are resampled.

    The patient bootstrap asks how the metric would move with other patients of the same
    hospitals; this one asks how it would move with other hospitals, the question a federation
    that generalises to new sites has to answer. Each resample draws as many sites as given, with
    replacement, and takes the mean of their values weighted by ``weights`` (patients, or the
    c-index's comparable pairs), as the combined value is. With fewer than two sites there is
    nothing to resample: the bounds are None and ``site_note`` says why.

    Returns ``{"site_ci_low", "site_ci_high", "site_n_boot", "site_n_boot_used", "site_note"?}``.
    """
    values, weights = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    if values.shape != weights.shape:
        raise ValueError("site_bootstrap_ci: values and weights must have the same length")
    out: dict = {"site_ci_low": None, "site_ci_high": None, "site_n_boot": int(n_boot), "site_n_boot_used": 0}
    if len(values) < 2:
        out["site_note"] = f"{len(values)} site(s): resampling sites needs at least 2"
        return out
    idx = resample_indices(len(values), n_boot, seed)
    w = weights[idx]
    total = w.sum(axis=1)
    ok = total > 0  # a resample of only zero-weight sites has no mean
    means = (w * values[idx]).sum(axis=1)[ok] / total[ok]
    out["site_n_boot_used"] = int(ok.sum())
    if ok.any():
        tail = 100.0 * (1.0 - level) / 2.0
        lo, hi = np.percentile(means, [tail, 100.0 - tail])
        out["site_ci_low"], out["site_ci_high"] = float(lo), float(hi)
    return out

"""Labels: subtype index, WHO grade by a configurable map, discrete survival bins."""

from __future__ import annotations

import numpy as np

from umeml.config import DataConfig


def subtype_codes(cfg: DataConfig) -> tuple[str, ...]:
    """Known subtype codes, in the order of the grade map (this order defines class indices)."""
    return tuple(cfg.grade_map)


def grade_index(code: str, cfg: DataConfig) -> int:
    """Class index of the WHO grade of subtype ``code`` (-1 when the code is unknown)."""
    grade = cfg.grade_map.get(code)
    return cfg.grades.index(grade) if grade is not None else -1


def survival_bin_edges(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """Interior bin edges (n_bins - 1 values) at quantiles of the uncensored times.

    ``events`` is 1 where death was observed (1 - censorship). Falls back to all times when
    fewer uncensored times than bins exist, so a tiny cohort still gets distinct bins.
    """
    times = np.asarray(times, dtype=float)
    observed = times[np.asarray(events) == 1]
    base = observed if len(observed) >= n_bins else times
    if len(base) == 0:
        raise ValueError("no survival times to place bin edges on")
    qs = np.linspace(0, 1, n_bins + 1)[1:-1]
    return np.quantile(base, qs)


def survival_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index (0..len(edges)) of each survival time."""
    return np.searchsorted(np.asarray(edges), np.asarray(times, dtype=float), side="right").astype(np.int64)


def edges_from_histogram(grid: np.ndarray, counts: np.ndarray, n_bins: int) -> np.ndarray:
    """Interior quantile edges from a histogram of uncensored times on a fine grid.

    Used by the federation, where only per-site histograms (never times) leave a site: the
    summed histogram's cumulative distribution is inverted at the quantile levels.
    """
    counts = np.asarray(counts, dtype=float)
    if counts.sum() <= 0:
        raise ValueError("empty survival histogram")
    cdf = np.cumsum(counts) / counts.sum()
    qs = np.linspace(0, 1, n_bins + 1)[1:-1]
    upper = np.asarray(grid)[1:]
    return np.array([upper[min(np.searchsorted(cdf, q, side="left"), len(upper) - 1)] for q in qs])

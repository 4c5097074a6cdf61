"""Survival metrics: Harrell's c-index through lifelines, with the sign convention handled.

Conventions of this module (the project's data convention, design section 4):

- ``censorship`` is 1 for a censored patient, 0 for an observed death (as in the CSV and
  :class:`~umeml.data.batch.Batch`); ``events=`` may be given instead (1 = death observed);
- ``risk`` is higher for a shorter expected survival (``umeml.train.losses.survival_risk``);
  lifelines expects the opposite (higher score = longer survival), so it receives ``-risk``.

A pair (i, j) is comparable when i died and ``t_i < t_j``, or i died and j was censored at the
same time (lifelines' definition). The federation weights site c-indices by these counts.
"""

from __future__ import annotations

import numpy as np

from umeml.errors import UmemlError
from umeml.metrics.bootstrap import bootstrap_ci, resample_indices

__all__ = ["NoComparablePairsError", "comparable_pairs", "concordance_index", "survival_metrics"]


class NoComparablePairsError(UmemlError, ValueError):
    """The c-index is undefined: no pair of patients can be ordered (e.g. no observed death)."""


def _events(censorship, events) -> np.ndarray:
    if (censorship is None) == (events is None):
        raise TypeError("give exactly one of censorship (1 = censored) or events (1 = death observed)")
    flags = np.asarray(censorship if events is None else events, dtype=np.float64).reshape(-1)
    if not np.isin(flags, (0.0, 1.0)).all():
        raise ValueError("censorship/event flags must be 0 or 1")
    flags = flags.astype(bool)
    return ~flags if events is None else flags


def _times(times) -> np.ndarray:
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if not np.isfinite(t).all():
        raise ValueError("survival times contain NaN or infinite values")
    return t


def comparable_pairs(times, censorship=None, *, events=None) -> int:
    """Number of comparable (orderable) patient pairs, as lifelines counts them."""
    t, e = _times(times), _events(censorship, events)
    if t.shape != e.shape:
        raise ValueError("times and censorship must have the same length")
    order = np.sort(t)
    censored_sorted = np.sort(t[~e])
    death_times = t[e]
    later = len(t) - np.searchsorted(order, death_times, side="right")
    censored_same = np.searchsorted(censored_sorted, death_times, side="right") - np.searchsorted(
        censored_sorted, death_times, side="left"
    )
    return int(later.sum() + censored_same.sum())


def concordance_index(times, censorship, risk, *, events=None) -> float:
    """Harrell's c-index of ``risk`` (higher = worse); 1.0 when risk orders all deaths perfectly.

    Raises :class:`NoComparablePairsError` when no pair is comparable.
    """
    t, e = _times(times), _events(censorship, events)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if not (t.shape == e.shape == r.shape):
        raise ValueError("times, censorship and risk must have the same length")
    if not np.isfinite(r).all():
        raise ValueError("risk contains NaN or infinite values")
    if comparable_pairs(t, events=e) == 0:
        raise NoComparablePairsError(
            f"c-index undefined: no comparable pair among {len(t)} patients "
            f"({int(e.sum())} observed deaths); a pair needs a death before another patient's time"
        )
    from lifelines.utils import concordance_index  # here, not at import: lifelines pulls in pandas and scipy

    return float(concordance_index(t, -r, e))


def survival_metrics(times, censorship, risk, n_boot: int = 1000, seed: int = 0) -> dict:
    """``{"c_index": {"value", "ci_low", "ci_high", "n", "n_boot", "n_boot_used", "pairs",
    "events"}}`` with a percentile bootstrap 95% CI (resamples without a comparable pair are
    skipped). ``censorship``: 1 = censored. Raises :class:`NoComparablePairsError` (a
    ``ValueError``) when the c-index is undefined on the full set.
    """
    t, e = _times(times), _events(censorship, None)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    value = concordance_index(t, None, r, events=e)
    entry = bootstrap_ci(
        lambda tt, ee, rr: concordance_index(tt, None, rr, events=ee),
        [t, e, r],
        indices=resample_indices(len(t), n_boot, seed),
        value=value,
    )
    entry["pairs"] = comparable_pairs(t, events=e)
    entry["events"] = int(e.sum())
    return {"c_index": entry}

"""Labels: which table columns each task needs, subtype and grade indices by the configured
label maps (any cancer, not only glioma), discrete survival bins."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from umeml.config import TASKS, DataConfig
from umeml.lazy import lazy_module

pd = lazy_module("pandas")  # imported when a table is read, not with the ClientApp

SUBTYPE_COLUMN = "oncotree_code"  # the default of ``data.subtype_column``
ID_COLUMNS = ("case_id", "slide_id")  # every task needs the patient and slide ids
SURVIVAL_COLUMNS = ("survival_months", "censorship")  # only the task survival reads them
SUBTYPE_TASKS = ("grade", "subtype")  # tasks whose label derives from the subtype code


def _tasks(tasks: Iterable[str] | None) -> set[str]:
    return set(TASKS if tasks is None else tasks)


def needs_subtype(tasks: Iterable[str] | None) -> bool:
    """Whether any of ``tasks`` (None: all tasks) needs a subtype code for every patient."""
    return bool(_tasks(tasks) & set(SUBTYPE_TASKS))


def needs_survival(tasks: Iterable[str] | None) -> bool:
    """Whether ``tasks`` (None: all tasks) include survival, the only reader of the survival
    columns (its bins, loss, histogram release and c-index)."""
    return "survival" in _tasks(tasks)


def column_needs(tasks: Iterable[str] | None, subtype_column: str = SUBTYPE_COLUMN) -> dict[str, tuple[str, ...]]:
    """Each table column an experiment with ``tasks`` (None: all tasks) cannot do without, with
    the tasks that need it (empty for the id columns, which every experiment needs)."""
    chosen = _tasks(tasks)
    needs = {c: () for c in ID_COLUMNS}
    if needs_survival(chosen):
        needs.update({c: ("survival",) for c in SURVIVAL_COLUMNS})
    if needs_subtype(chosen):
        needs[subtype_column] = tuple(t for t in SUBTYPE_TASKS if t in chosen)
    return needs


def required_columns(tasks: Iterable[str] | None, subtype_column: str = SUBTYPE_COLUMN) -> tuple[str, ...]:
    """The table columns an experiment with ``tasks`` (None: all tasks) cannot do without."""
    return tuple(column_needs(tasks, subtype_column))


def clean_code(value) -> str | None:
    """A table cell as a subtype code: None when it is empty or NaN (a missing subtype, never
    the string "nan"), else the stripped text."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = str(value).strip()
    return text or None


def subtype_codes(cfg: DataConfig) -> tuple[str, ...]:
    """Known subtype codes in class-index order: ``data.subtypes`` when given, else the keys of
    the grade map (the glioma default: ASTR, OAST, ODG, AASTR, AOAST, GBM)."""
    return tuple(cfg.subtypes) if cfg.subtypes else tuple(cfg.grade_map)


def subtype_index(code: str | None, cfg: DataConfig) -> int:
    """Class index of subtype ``code`` (-1 when it is missing or unknown)."""
    codes = subtype_codes(cfg)
    return codes.index(code) if code in codes else -1


def grade_index(code: str | None, cfg: DataConfig) -> int:
    """Class index of the grade of subtype ``code`` by ``data.grade_map`` (-1 when the code is
    missing or has no grade)."""
    grade = cfg.grade_map.get(code) if code is not None else None
    return cfg.grades.index(grade) if grade is not None else -1


def label_counts(indices: Iterable[int], n_classes: int) -> list[int]:
    """Patients per class from class indices; missing labels (-1) are not counted."""
    known = [i for i in indices if i >= 0]
    return np.bincount(np.asarray(known, dtype=np.int64), minlength=n_classes).tolist()


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


def edges_from_histogram(grid: np.ndarray, counts: np.ndarray, n_bins: int,
                         notes: list[str] | None = None) -> np.ndarray:
    """Interior quantile edges (n_bins - 1 strictly increasing points of ``grid``) from a
    histogram of uncensored times, exact or noisy.

    Used by the federation, where only per-site histograms (never times) leave a site. With
    differential privacy the counts carry two-sided noise and can be negative; they are not
    clipped per cell (clipping adds mass to every empty cell, i.e. into the long tail, and
    drags the edges there). Instead the cumulative sum is made monotone (running maximum,
    clipped to [0, total]) and inverted at the quantile levels q * total.

    When the total is below ``n_bins`` (a tiny or empty federation, or noise larger than the
    signal) quantiles of the positive part of the histogram are used, and when that is empty
    too, edges at evenly spaced cells of the grid. Quantiles falling into the same cell are moved
    apart by whole cells, so the edges are always strictly increasing. Each fallback and
    adjustment is described in ``notes`` (when given) for the caller to log.
    """
    grid = np.asarray(grid, dtype=float)
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 1 or len(grid) != len(counts) + 1:
        raise ValueError(f"histogram has {counts.size} cells but the grid has {len(grid)} edges "
                         f"(expected {len(grid) - 1} cells)")
    if not 2 <= n_bins <= len(grid) - 1:
        raise ValueError(f"survival.n_bins {n_bins}: a histogram of {len(grid) - 1} cells gives 2 to "
                         f"{len(grid) - 1} bins")
    notes = notes if notes is not None else []
    qs = np.linspace(0, 1, n_bins + 1)[1:-1]
    total = float(counts.sum())
    if total >= n_bins:
        cdf = np.clip(np.maximum.accumulate(np.cumsum(counts)), 0.0, total)
        # first cell whose cumulative count reaches q * total; its upper edge is the bin edge
        cells = np.searchsorted(cdf, qs * total, side="left")
    else:
        positive = np.clip(counts, 0.0, None)
        if positive.sum() > 0:
            notes.append(f"survival histogram total {total:.1f} < n_bins {n_bins}: bin edges from the "
                         f"quantiles of its positive cells ({positive.sum():.0f} counts), not the federation's times")
            cells = np.searchsorted(np.cumsum(positive), qs * positive.sum(), side="left")
        else:
            notes.append(f"survival histogram has no positive cell (total {total:.1f}): bin edges at evenly "
                         "spaced cells of the grid")
            cells = np.round(qs * (len(grid) - 1)).astype(int) - 1
    # interior edges are grid[1:-1] (index 0 = grid[1]); keep them distinct and inside
    idx = np.clip(np.asarray(cells, dtype=int), 0, len(grid) - 3)
    fixed = idx.copy()
    for i in range(1, len(fixed)):
        fixed[i] = max(fixed[i], fixed[i - 1] + 1)
    fixed[-1] = min(fixed[-1], len(grid) - 3)
    for i in range(len(fixed) - 2, -1, -1):
        fixed[i] = min(fixed[i], fixed[i + 1] - 1)
    if not np.array_equal(fixed, idx):
        notes.append(f"survival bin edges {grid[idx + 1].tolist()} moved apart to {grid[fixed + 1].tolist()} "
                     "(several quantiles fell into one grid cell)")
    return grid[fixed + 1]

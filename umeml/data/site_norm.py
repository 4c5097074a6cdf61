"""Site-wise standardisation of patch features (``data.site_standardise: features``).

A site's scanner, stain and section thickness move every patch embedding of its slides the same
way; a model trained on other sites then sees a shifted input (the synthetic cohort's stain
shift: a per-site offset and scale of every feature). Each site standardises its own patch
features: ``x -> (x - m_s) / s_s``, with ``m_s`` the mean over the site's patients of each
patient's mean patch feature and ``s_s`` the root mean square deviation of its patches from
``m_s`` per feature (one number). The rules:

- Statistics are per patient first (each patient weighs the same, whatever its number of
  patches), over all of a site's patients with pathology (training, validation and test alike:
  no label is read), all slides merged, no subsampling.
- Exact statistics (:func:`exact_standardisers`) wherever no privacy applies: central training,
  the pooled reference, a site outside statistics privacy. Under statistics privacy a site
  standardises with its own DP release (``stats_release.feature_moments_release``, recorded in its
  ledger and composed into its total): an exact mean would make every patient's input depend on
  every other patient, outside what DP-SGD's per-patient clipping bounds.
- The statistics never leave the site; only the epsilon of the release is reported.
- The variance is floored at a hundredth of the mean square (a DP sum of squares can fall below
  the centre's own) and a site whose patches do not vary is left unscaled; a patient without
  real patches does not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import numpy as np

from umeml.data.bags import read_features

MIN_SCALE = 1e-6  # below it a site is left unscaled rather than blown up


@dataclass(frozen=True)
class SiteStandardiser:
    """One site's feature centre (D,) and scale; ``source`` says how they were obtained."""

    mean: np.ndarray
    scale: float
    source: str  # "exact" or "dp" (a DP release of the site's moments)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """``(features - mean) / scale`` as float32."""
        return ((np.asarray(features, np.float32) - self.mean.astype(np.float32)) / np.float32(self.scale))


def applies(cfg, cohort, idx: np.ndarray | None = None) -> bool:
    """Whether ``cfg`` standardises patch features of ``cohort`` (``data.site_standardise``, a model
    that reads pathology, bags on disk; with ``idx``: and one of those patients has pathology)."""
    if cfg.data.site_standardise != "features" or "pathology" not in cfg.model.modalities or cohort.bag_dir is None:
        return False
    return idx is None or bool(np.asarray(cohort.has_path)[np.asarray(idx, dtype=np.int64)].any())


@lru_cache(maxsize=65536)
def _patient_moments(files: tuple[str, ...]) -> tuple[np.ndarray, float] | None:
    """A patient's mean patch feature (D,) and mean squared value per feature (over patches and
    features); None without a real patch. Cached: a site reads each bag once per process."""
    parts = [np.asarray(read_features(f), np.float64) for f in files]
    feats = np.concatenate(parts, axis=0) if parts else np.zeros((0, 0))
    if feats.shape[0] == 0:
        return None
    return feats.mean(axis=0), float(np.mean(feats ** 2))


def patient_moments(cohort, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per patient of ``idx`` with pathology: mean features (n, D) and mean squares (n,)."""
    means, squares = [], []
    for i in np.asarray(idx, dtype=np.int64):
        files = cohort.bag_files(int(i)) if cohort.bag_dir is not None and cohort.has_path[i] else []
        got = _patient_moments(tuple(str(f) for f in files)) if files else None
        if got is not None:
            means.append(got[0])
            squares.append(got[1])
    dim = int(cohort.feature_dim or 0)
    return (np.array(means, np.float64).reshape(-1, dim), np.array(squares, np.float64))


def from_moments(count: float, total: np.ndarray, total_sq: float, source: str) -> SiteStandardiser:
    """The standardiser of ``count`` patients whose mean features sum to ``total`` and whose mean
    squares sum to ``total_sq``: centre ``total / count``, scale ``sqrt(E[x^2] - |centre|^2 / D)``."""
    if count < 1.0:
        raise ValueError(f"site standardisation needs at least one patient with pathology (count {count:g})")
    mean = np.asarray(total, np.float64) / count
    mean_square = max(float(total_sq) / count, 0.0)
    # a noisy sum of squares can fall below the centre's own: keep at least a tenth of the RMS
    var = max(mean_square - float(np.mean(mean ** 2)), 0.01 * mean_square)
    scale = float(np.sqrt(var))
    return SiteStandardiser(mean, scale if scale > MIN_SCALE else 1.0, source)


def exact_standardiser(cohort, idx: np.ndarray) -> SiteStandardiser:
    """The exact standardiser of the patients ``idx`` (one site's)."""
    means, squares = patient_moments(cohort, idx)
    return from_moments(float(len(means)), means.sum(axis=0), float(squares.sum()), "exact")


def exact_standardisers(cohort, idx: np.ndarray) -> dict[str, SiteStandardiser]:
    """Exact standardisers of every site with a patient in ``idx``, each over all of that site's
    patients in ``cohort`` (a site's test patients are standardised as its training ones)."""
    sites = sorted({cohort.patients[int(i)].site for i in idx})
    out = {}
    for site in sites:
        site_idx = cohort.site_indices(site)
        if np.asarray(cohort.has_path)[site_idx].any():
            out[site] = exact_standardiser(cohort, site_idx)
    return out


def standardise(features: np.ndarray, site: str, standardisers: Mapping[str, SiteStandardiser] | None,
                where: str) -> np.ndarray:
    """``features`` of a patient of ``site`` standardised; a missing site is an error, not a silent pass."""
    if standardisers is None:
        return features
    std = standardisers.get(site)
    if std is None:
        raise KeyError(f"{where}: data.site_standardise is 'features' but site {site!r} has no standardiser "
                       f"(known: {sorted(standardisers)})")
    return std.apply(features)


def check_checkpoint(meta: dict, site_standardise: str, path: str) -> None:
    """Refuse a starting checkpoint trained with other patch-feature standardisation than the run's
    (its meta's ``site_standardise``, recorded by ``umeml train``; absent: "none"): its model would
    see inputs on another scale and centre."""
    from umeml.errors import ConfigError

    saved = meta.get("site_standardise", "none")
    if saved != site_standardise:
        raise ConfigError(f"{path}: federation.init_checkpoint was trained with data.site_standardise {saved!r}, "
                          f"this run has {site_standardise!r}: set the same (its model expects those inputs)")

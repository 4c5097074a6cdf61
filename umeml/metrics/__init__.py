"""Metrics with bootstrap confidence intervals; every result carries its n (design section 6)."""

from umeml.metrics.bootstrap import bootstrap_ci, metric_entry, resample_indices, site_bootstrap_ci
from umeml.metrics.classification import (
    accuracy,
    auc_macro_ovr,
    auc_micro,
    balanced_accuracy,
    binary_auc,
    classification_metrics,
    confusion_matrix,
)
from umeml.metrics.survival import (
    NoComparablePairsError,
    comparable_pairs,
    concordance_index,
    survival_metrics,
)

__all__ = [
    "NoComparablePairsError",
    "accuracy",
    "auc_macro_ovr",
    "auc_micro",
    "balanced_accuracy",
    "binary_auc",
    "bootstrap_ci",
    "classification_metrics",
    "comparable_pairs",
    "concordance_index",
    "confusion_matrix",
    "metric_entry",
    "resample_indices",
    "site_bootstrap_ci",
    "survival_metrics",
]

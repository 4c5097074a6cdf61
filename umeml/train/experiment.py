"""One prepared experiment: what is derived from the training patients, and what is built from it.

:class:`Preprocessing` holds the survival bin edges, the genomic standardisation, the class
weights and the model's input and output sizes. Centralized training fits it on its training
split (:func:`prepare`); a federation combines it from the sites' aggregates
(:func:`umeml.federation.protocol.combine_preprocessing`), sends it with every round and saves
it as ``preprocessing.json``. From it the centralized trainer, every site and the pooled
simulation metrics build the same model (:func:`build_model`), datasets (:func:`make_dataset`)
and loss settings (:func:`loss_settings`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from umeml.config import ExperimentConfig
from umeml.data.cohort import Cohort
from umeml.data.dataset import CohortDataset, GenomicScaler
from umeml.data.labels import survival_bin_edges
from umeml.model import build_model as build_registered_model
from umeml.train.loop import LossSettings, task_heads
from umeml.train.losses import class_weights_from_counts

__all__ = ["Preprocessing", "build_model", "loss_settings", "make_dataset", "prepare"]


@dataclass
class Preprocessing:
    """Everything derived from the training patients, in plain JSON types (it crosses the wire
    and is saved as ``preprocessing.json``)."""

    survival_edges: list[float]  # empty without the task survival
    genomic_mean: list[float] | None
    genomic_std: list[float] | None
    class_weights: dict[str, list[float]]
    heads: dict[str, int]
    feature_dim: int
    group_sizes: list[int]
    subtypes: list[str]
    grades: list[str]

    @property
    def edges(self) -> np.ndarray:
        """Interior survival bin edges as an array."""
        return np.asarray(self.survival_edges)

    @property
    def scaler(self) -> GenomicScaler | None:
        """The genomic standardisation (None without genomics)."""
        if self.genomic_mean is None:
            return None
        return GenomicScaler(np.asarray(self.genomic_mean, np.float32), np.asarray(self.genomic_std, np.float32))

    def to_json(self) -> str:
        """Serialise for a ConfigRecord or ``preprocessing.json``."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        """Parse what :meth:`to_json` wrote (ValueError naming the keys that do not fit)."""
        raw = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"preprocessing: expected the keys {sorted(names)}, got {got}")
        return cls(**raw)


def prepare(cfg: ExperimentConfig, cohort: Cohort, train_idx: np.ndarray) -> Preprocessing:
    """Fit survival bin edges, genomic scaler and class weights on the training patients only
    (no bin edges without the task survival: its columns are not even read then)."""
    edges = np.zeros(0)
    if "survival" in cfg.tasks:
        times, events = cohort.times_events(train_idx)
        edges = survival_bin_edges(times, events, cfg.survival.n_bins)
    has_genomics = cohort.gene_groups.dim and cohort.has_genomics[train_idx].any()
    scaler = GenomicScaler.fit(cohort, train_idx) if has_genomics else None
    weights = {}
    if "grade" in cfg.tasks:
        counts = np.bincount([cohort.grade_index(i) for i in train_idx], minlength=len(cohort.grades))
        weights["grade"] = class_weights_from_counts(counts).tolist()
    if "subtype" in cfg.tasks:
        counts = np.bincount([cohort.subtype_index(i) for i in train_idx], minlength=len(cohort.subtypes))
        weights["subtype"] = class_weights_from_counts(counts).tolist()
    return Preprocessing(
        survival_edges=edges.tolist(),
        genomic_mean=None if scaler is None else scaler.mean.tolist(),
        genomic_std=None if scaler is None else scaler.std.tolist(),
        class_weights=weights,
        heads=task_heads(cfg, len(cohort.subtypes)),
        feature_dim=int(cohort.feature_dim or 1),
        group_sizes=list(cohort.gene_groups.sizes),
        subtypes=list(cohort.subtypes),
        grades=list(cohort.grades),
    )


def build_model(cfg: ExperimentConfig, prep: Preprocessing) -> nn.Module:
    """The experiment's model for ``prep``'s input and output sizes (seed torch before for a
    reproducible initialisation)."""
    return build_registered_model(cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)


def make_dataset(cfg: ExperimentConfig, cohort: Cohort, idx: np.ndarray, prep: Preprocessing,
                 train: bool, standardisers: dict | None = None) -> CohortDataset:
    """Patients ``idx`` of ``cohort`` with ``prep``'s bins and scaler and the experiment's
    modalities and bag subsampling (training only); coords only for a spatial-context model.
    With ``data.site_standardise: features`` every patient's patch features are standardised with
    its site's ``standardisers`` (a site under statistics privacy passes its DP one), by default
    the exact ones of :func:`umeml.data.site_norm.exact_standardisers`."""
    from umeml.data.site_norm import applies, exact_standardisers

    if not applies(cfg, cohort):
        standardisers = None
    elif standardisers is None:
        standardisers = exact_standardisers(cohort, idx)
    return CohortDataset(
        cohort, idx, prep.edges, prep.scaler,
        max_patches=cfg.data.max_patches, train=train, seed=cfg.seed,
        use_pathology="pathology" in cfg.model.modalities,
        use_genomics="genomics" in cfg.model.modalities,
        with_coords=cfg.model.spatial_context != "none",
        standardisers=standardisers,
    )


def loss_settings(cfg: ExperimentConfig, prep: Preprocessing) -> LossSettings:
    """The experiment's tasks and survival alpha with ``prep``'s class weights (on the CPU)."""
    weights = {t: torch.tensor(w, dtype=torch.float32) for t, w in prep.class_weights.items()}
    return LossSettings(tuple(cfg.tasks), weights, cfg.survival.alpha)

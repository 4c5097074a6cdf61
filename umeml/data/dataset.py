"""A torch Dataset over a cohort's patients: lazy bag reads, standardised genomics, targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from umeml.data.bags import BagError, read_coords, read_features
from umeml.data.batch import PatientItem, collate
from umeml.data.cohort import Cohort
from umeml.data.labels import survival_bins
from umeml.data.site_norm import SiteStandardiser, standardise


@dataclass(frozen=True)
class GenomicScaler:
    """Per-feature standardisation fitted on training patients (or federated aggregates)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_moments(cls, count: np.ndarray, total: np.ndarray, total_sq: np.ndarray) -> "GenomicScaler":
        """Build from per-feature count, sum and sum of squares (what sites share in a federation)."""
        count = np.maximum(np.asarray(count, dtype=float), 1.0)
        mean = np.asarray(total) / count
        var = np.maximum(np.asarray(total_sq) / count - mean**2, 0.0)
        std = np.sqrt(var)
        return cls(mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32))

    @classmethod
    def fit(cls, cohort: Cohort, indices: np.ndarray) -> "GenomicScaler":
        """Fit on the given patients that have genomics."""
        count, total, total_sq = genomic_moments(cohort, indices)
        return cls.from_moments(count, total, total_sq)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise one genomic vector."""
        return ((x - self.mean) / self.std).astype(np.float32)


def genomic_moments(cohort: Cohort, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature count, sum and sum of squares over the patients with genomics."""
    idx = np.asarray(indices, dtype=np.int64)
    rows = cohort.genomics[idx][cohort.has_genomics[idx]].astype(np.float64)
    count = np.full(cohort.genomics.shape[1], float(len(rows)))
    return count, rows.sum(axis=0), (rows**2).sum(axis=0)


SLIDE_GAP = 2**16  # level-0 pixels between a patient's slides once merged (far beyond any neighbourhood)


def merge_slide_coords(parts: list[np.ndarray]) -> np.ndarray:
    """One patient's slides' coords as one (N, 2) float array in which no patch of one slide lies
    near a patch of another: each slide is shifted along x past the previous one by ``SLIDE_GAP``
    (a model with spatial context must never take two slides' patches for neighbours)."""
    out, start = [], 0.0
    for coords in parts:
        c = np.asarray(coords, dtype=np.float64)
        if len(c):
            c = c - np.array([c[:, 0].min() - start, 0.0])
            start = float(c[:, 0].max()) + SLIDE_GAP
        out.append(c)
    return np.concatenate(out, axis=0) if out else np.zeros((0, 2))


class CohortDataset(Dataset):
    """Patients ``indices`` of ``cohort``; bags are read from disk when an item is fetched.

    In training mode each bag is randomly subsampled to ``max_patches`` (seeded per epoch and
    item); in evaluation mode the full bag is used. ``with_coords``: also read each bag's patch
    coordinates (only a model with ``model.spatial_context`` uses them; otherwise items carry
    none and no bag is opened twice). ``standardisers`` (site -> :class:`SiteStandardiser`,
    ``data.site_standardise: features``): each patient's patch features are standardised with its
    site's.
    """

    def __init__(
        self,
        cohort: Cohort,
        indices: np.ndarray,
        survival_edges: np.ndarray,
        scaler: GenomicScaler | None = None,
        max_patches: int | None = None,
        train: bool = False,
        seed: int = 0,
        use_pathology: bool = True,
        use_genomics: bool = True,
        with_coords: bool = False,
        standardisers: dict[str, SiteStandardiser] | None = None,
    ):
        self.cohort = cohort
        self.indices = np.asarray(indices, dtype=np.int64)
        self.edges = np.asarray(survival_edges)
        self.scaler = scaler
        self.max_patches = max_patches if train else None
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.use_pathology = use_pathology and cohort.bag_dir is not None
        self.use_genomics = use_genomics and cohort.gene_groups.dim > 0
        self.with_coords = with_coords
        self.standardisers = standardisers

    @property
    def feature_dim(self) -> int:
        """Patch feature dimension (0 without pathology)."""
        return int(self.cohort.feature_dim or 0)

    @property
    def genomic_dim(self) -> int:
        """Length of the concatenated genomic vector."""
        return int(self.cohort.gene_groups.dim)

    def set_epoch(self, epoch: int) -> None:
        """Change the subsampling seed so each epoch sees other patches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def _features(self, i: int, position: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The patient's patch features and their coords (slides merged, training subsample;
        None unless ``with_coords``)."""
        files = self.cohort.bag_files(i) if self.use_pathology else []
        if not files:
            return None, None
        rng = np.random.default_rng([self.seed, self.epoch, position])
        parts = [read_features(f) for f in files]
        feats = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        feats = standardise(feats, self.cohort.patients[i].site, self.standardisers, str(files[0]))
        coords = self._coords(files, parts) if self.with_coords else None
        if self.max_patches is not None and feats.shape[0] > self.max_patches:
            keep = np.sort(rng.choice(feats.shape[0], self.max_patches, replace=False))
            feats, coords = feats[keep], (None if coords is None else coords[keep])
        return feats, coords

    @staticmethod
    def _coords(files, parts: list[np.ndarray]) -> np.ndarray:
        """The slides' coords merged (:func:`merge_slide_coords`), each checked against its features."""
        coord_parts = [read_coords(f) for f in files]
        for f, p, c in zip(files, parts, coord_parts):
            if len(c) != len(p):
                raise BagError(f"{f}: 'features' has {len(p)} rows but 'coords' has {len(c)}")
        return merge_slide_coords(coord_parts).astype(np.float32)

    def __getitem__(self, position: int) -> PatientItem:
        i = int(self.indices[position])
        c = self.cohort
        p = c.patients[i]
        genomics = None
        if self.use_genomics and c.has_genomics[i]:
            genomics = c.genomics[i] if self.scaler is None else self.scaler.transform(c.genomics[i])
        features, coords = self._features(i, position)
        return PatientItem(
            features=features,
            coords=coords,
            genomics=genomics,
            grade=c.grade_index(i),
            subtype=c.subtype_index(i),
            **self._survival(p.survival_months, p.censorship),
        )

    def _survival(self, months: float | None, censorship: int | None) -> dict:
        """The survival targets; a cohort read without the task survival has none (bin -1, time
        NaN, censorship -1: no loss or metric reads them then)."""
        if months is None:
            return {"survival_bin": -1, "survival_months": float("nan"), "censorship": -1}
        return {"survival_bin": int(survival_bins(np.array([months]), self.edges)[0]),
                "survival_months": months, "censorship": censorship}

    def collate(self, items: list[PatientItem]):
        """Collate function for a DataLoader over this dataset."""
        return collate(items, self.feature_dim, self.genomic_dim)


def make_loader(dataset: CohortDataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0):
    """A DataLoader with the padding collate and a seeded shuffle."""
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        collate_fn=dataset.collate,
        num_workers=num_workers,
    )

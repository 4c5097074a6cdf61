"""The batch every model takes: padded bags with masks, gene-group features, modality masks.

A batch may hold 0, 1 or many patients (Poisson sampling under DP can give an empty batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class Batch:
    """Tensors for B patients, batch-first.

    - ``features``: (B, M, D) float32 patch features, zero-padded to the longest bag M;
    - ``patch_mask``: (B, M) bool, True where a real patch sits;
    - ``genomics``: (B, G) float32, the gene groups' columns concatenated group after group
      (group sizes come from the cohort's :class:`~umeml.data.genomics.GeneGroups`);
    - ``has_path`` / ``has_genomics``: (B,) bool modality masks; a missing modality's tensors
      are zero and must be ignored by the model (it uses a learned missing-modality token);
    - ``grade``, ``subtype``, ``survival_bin``: (B,) int64 targets, -1 where unknown;
    - ``survival_months``: (B,) float32; ``censorship``: (B,) int64 (1 = censored);
    - ``coords``: (B, M, 2) float32 patch coordinates (level-0 pixels, zero where padded), or
      None when a patient with patches came without them; only a model with
      ``model.spatial_context`` reads them (slides of one patient never share a neighbourhood:
      :func:`umeml.data.dataset.merge_slide_coords`).
    """

    features: torch.Tensor
    patch_mask: torch.Tensor
    genomics: torch.Tensor
    has_path: torch.Tensor
    has_genomics: torch.Tensor
    grade: torch.Tensor
    subtype: torch.Tensor
    survival_bin: torch.Tensor
    survival_months: torch.Tensor
    censorship: torch.Tensor
    coords: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.has_path.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        """Move every tensor to ``device``."""
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                        for f in fields(self)})

    def model_inputs(self) -> tuple[torch.Tensor | None, ...]:
        """Positional inputs of ``model.forward``: features, patch_mask, genomics, has_path,
        has_genomics, coords (None when the batch has none)."""
        return (self.features, self.patch_mask, self.genomics, self.has_path, self.has_genomics, self.coords)


@dataclass
class PatientItem:
    """One patient as a dataset yields it (numpy arrays; a missing modality is ``None``)."""

    features: np.ndarray | None  # (N, D) float32
    genomics: np.ndarray | None  # (G,) float32
    grade: int
    subtype: int
    survival_bin: int
    survival_months: float
    censorship: int
    coords: np.ndarray | None = None  # (N, 2) patch coordinates, rows aligned with features


def collate(items: list[PatientItem], feature_dim: int, genomic_dim: int) -> Batch:
    """Pad a list of patients into a :class:`Batch`; an empty list gives a batch of size 0."""
    b = len(items)
    m = max([0] + [it.features.shape[0] for it in items if it.features is not None])
    m = max(m, 1)  # keep the patch axis non-empty so attention kernels see a valid shape
    feats = torch.zeros(b, m, feature_dim)
    mask = torch.zeros(b, m, dtype=torch.bool)
    gen = torch.zeros(b, genomic_dim)
    has_path = torch.zeros(b, dtype=torch.bool)
    has_gen = torch.zeros(b, dtype=torch.bool)
    coords = torch.zeros(b, m, 2)
    all_coords = True
    for i, it in enumerate(items):
        if it.features is not None and it.features.shape[0] > 0:
            n = it.features.shape[0]
            feats[i, :n] = torch.from_numpy(it.features)
            mask[i, :n] = True
            has_path[i] = True
            if it.coords is None:
                all_coords = False
            elif it.coords.shape != (n, 2):
                raise ValueError(f"patient {i}: coords must be ({n}, 2) like its features, got {it.coords.shape}")
            else:
                coords[i, :n] = torch.from_numpy(np.asarray(it.coords, dtype=np.float32))
        if it.genomics is not None:
            gen[i] = torch.from_numpy(it.genomics)
            has_gen[i] = True

    def ints(name: str) -> torch.Tensor:
        return torch.tensor([getattr(it, name) for it in items], dtype=torch.long)

    return Batch(
        features=feats,
        patch_mask=mask,
        genomics=gen,
        has_path=has_path,
        has_genomics=has_gen,
        grade=ints("grade"),
        subtype=ints("subtype"),
        survival_bin=ints("survival_bin"),
        survival_months=torch.tensor([it.survival_months for it in items], dtype=torch.float32),
        censorship=ints("censorship"),
        coords=coords if all_coords else None,
    )

"""Spatial context for UMEML's patch embeddings: neighbours on the patch grid (``model.spatial_context``).

Why: a coordinate-blind MIL model sees a bag as a set, so every label it can learn is a function
of the bag's feature distribution; where patches lie relative to each other (a compact tumour
focus, heterogeneous at patch scale, inside homogeneous background regions) never reaches it.
With ``spatial_context: neighbours`` each patch embedding also carries its neighbourhood's:

    H_i <- H_i + n_i * LayerNorm(Linear(mean_{j in N(i)} H_j))

before the prototypes' cross-attention (or the mean-pool ablation) and the modularity loss,
where ``N(i)`` are the real patches of the same bag within Chebyshev distance ``spatial_radius``
on the patch grid (radius 1: the 8 surrounding cells) and ``n_i`` is 1 when ``N(i)`` is not
empty, else 0 (an isolated patch keeps its embedding unchanged). ``spatial_context: none`` (the
default) builds nothing and never reads ``coords``: shipped configs and checkpoints are unchanged.

Design choices:

- **Grid lookup, not k-nearest neighbours.** Patch coordinates of CLAM/TRIDENT and ``umeml
  extract`` bags sit on a grid of the patch size; a bag's grid step is taken as the smallest
  positive difference of its x or y coordinates (the patch size on a full grid; a bag without
  two distinct coordinates has no neighbours). Cells are integer (x, y) keys, sorted once per
  batch; every neighbour offset is one ``searchsorted`` over the sorted keys. Memory is
  O(B M (2r+1)^2) integers and O(B M d) floats (the neighbour mean is accumulated offset by
  offset, never a (B, M, k, d) tensor): linear in M, no M x M matrix.
- **Bags never mix.** The bag index is part of every key, padded patches (and bags without
  pathology) get keys that no query can match, so a bag's output never depends on the other
  bags of its batch (what DP-SGD's per-sample clipping needs) and padding is never a neighbour.
- **DP-exact.** The neighbour indices are integer data computed without gradients; the only
  parameters are one ``nn.Linear`` and one ``nn.LayerNorm``, whose Opacus per-sample gradients
  are exact on (B, M, d) inputs. The same module serves DP and non-DP sites, so weights average.
- **A zero-initialised gate** (``model.spatial_gate_init``, default 0): the LayerNorm weight
  starts at that value, so with 0 the term is exactly zero and the model starts as plain UMEML,
  opening the gate only as far as training finds the context useful (a unit-scale term from the
  first step was suspected of acting as noise in the prototypes' keys; the first spatial figures
  in docs/benchmarks.md used gate 1).
- **Training subsamples.** ``data.max_patches`` subsamples large bags at random in training, so a
  patch there has fewer neighbours than in evaluation (full bags); ``n_i`` and the mean (not the
  sum) keep the update's scale independent of how many neighbours are present.
- **No positional encoding of absolute coordinates**: where a biopsy sits on a glass slide says
  nothing about the patient; only relative positions carry tissue structure.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SpatialContext", "grid_neighbours", "grid_step", "neighbour_mean"]


def grid_step(coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per bag (B,): the smallest positive difference of the real patches' x or y coordinates;
    1.0 for a bag without two distinct coordinates (it then has no neighbours anyway)."""
    if coords.shape[1] < 2:
        return coords.new_ones(coords.shape[:1])
    steps = []
    for axis in range(2):
        vals = coords[..., axis].masked_fill(~mask, float("inf"))
        diffs = vals.sort(dim=1).values.diff(dim=1)
        ok = torch.isfinite(diffs) & (diffs > 0)
        steps.append(diffs.masked_fill(~ok, float("inf")).amin(dim=1))
    step = torch.minimum(*steps)
    return torch.where(torch.isfinite(step), step, torch.ones_like(step))


def _cells(coords: torch.Tensor, mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Integer grid cells (B, M, 2), shifted so that every neighbour offset stays >= 0."""
    step = grid_step(coords, mask)[:, None, None]
    low = coords.masked_fill(~mask[..., None], float("inf")).amin(dim=1, keepdim=True)
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    cells = torch.round((coords - low) / step).to(torch.int64) + radius
    return cells.masked_fill(~mask[..., None], 0)


def grid_neighbours(coords: torch.Tensor, mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Flat indices into ``(B*M)`` of every patch's grid neighbours, (B, M, (2r+1)^2 - 1), -1 where
    a neighbour cell holds no real patch of the same bag (and for every padded patch).

    ``coords`` (B, M, 2) are patch corner coordinates, ``mask`` (B, M) True for real patches.
    """
    if radius < 1:
        raise ValueError(f"spatial radius must be >= 1, got {radius}")
    b, m = mask.shape
    offsets = [(dx, dy) for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1) if dx or dy]
    if b * m == 0:
        return torch.full((b, m, len(offsets)), -1, dtype=torch.int64, device=mask.device)
    with torch.no_grad():
        cells = _cells(coords.double(), mask, radius)
        span = int(cells.max()) + radius + 1  # every neighbour coordinate lies in [0, span)
        bag = torch.arange(b, device=mask.device)[:, None]

        def key(cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
            return (bag * span + cx) * span + cy

        keys = key(cells[..., 0], cells[..., 1]).masked_fill(~mask, -1).flatten()  # -1: never matched
        sorted_keys, order = keys.sort()
        found = []
        for dx, dy in offsets:
            query = key(cells[..., 0] + dx, cells[..., 1] + dy).flatten()
            pos = torch.searchsorted(sorted_keys, query).clamp_max(keys.numel() - 1)
            hit = (sorted_keys[pos] == query) & mask.flatten()
            found.append(torch.where(hit, order[pos], torch.full_like(pos, -1)))
        return torch.stack(found, dim=1).reshape(b, m, len(offsets))


def neighbour_mean(h: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``h`` (B, M, d) over each patch's ``neighbours`` (from :func:`grid_neighbours`) and
    whether a patch has any (B, M) bool; zeros where it has none. Accumulated one offset at a
    time, so memory stays O(B M d)."""
    b, m, d = h.shape
    flat = h.reshape(b * m, d)
    total = h.new_zeros(b * m, d)
    count = h.new_zeros(b * m, 1)
    for j in range(neighbours.shape[-1]):
        idx = neighbours[..., j].reshape(-1)
        hit = (idx >= 0).to(h.dtype)[:, None]
        total = total + flat[idx.clamp_min(0)] * hit
        count = count + hit
    mean = total / count.clamp_min(1.0)
    return mean.reshape(b, m, d), (count > 0).reshape(b, m)


class SpatialContext(nn.Module):
    """``H <- H + n * LayerNorm(Linear(neighbour mean of H))`` (module docstring)."""

    def __init__(self, dim: int, radius: int = 1, gate_init: float = 1.0):
        super().__init__()
        if radius < 1:
            raise ValueError(f"spatial radius must be >= 1, got {radius}")
        self.radius = int(radius)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        # the gate: the LayerNorm weight (its bias starts at zero), so gate_init 0 makes the term
        # exactly zero at init while its gradient (normalised input x upstream) is not
        nn.init.constant_(self.norm.weight, float(gate_init))

    def forward(self, h: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, M, d) embeddings, (B, M, 2) coordinates, (B, M) real-patch mask -> (B, M, d)."""
        if coords.shape != (*h.shape[:2], 2):
            raise ValueError(f"coords must be (B, M, 2) = {(*h.shape[:2], 2)}, got {tuple(coords.shape)}")
        mean, has = neighbour_mean(h, grid_neighbours(coords, mask, self.radius))
        return h + has[..., None].to(h.dtype) * self.norm(self.proj(mean))

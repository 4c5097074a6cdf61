"""Patch grid at the target resolution and the plan for reading it from the pyramid.

A patch is ``patch_size`` pixels at the target resolution, i.e. ``patch_size * downsample``
level-0 pixels. It is read from the highest pyramid level that is not coarser than the target
(so the pixels are never upsampled when a pyramid level can serve) and resized when that level's
resolution does not match the target exactly. Coordinates are level-0 pixels of the patch's
top-left corner (CLAM/TRIDENT convention); only patches entirely inside the slide are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .slides import Slide, TargetResolution
from .tissue import TissueMask

__all__ = ["ReadPlan", "plan_read", "resize_patch", "tissue_grid"]


@dataclass(frozen=True)
class ReadPlan:
    """How one slide's patches are read: pyramid ``level``, ``read_size`` pixels square there,
    then resized to ``patch_size`` (the target resolution); ``patch_size_level0`` is the patch's
    side in level-0 pixels and ``downsample`` the level-0 pixels per target pixel."""

    level: int
    level_downsample: float
    read_size: int
    patch_size: int
    patch_size_level0: int
    downsample: float

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.patch_size


def plan_read(slide: Slide, target: TargetResolution, patch_size: int) -> ReadPlan:
    """Pick the pyramid level and read size for patches of ``patch_size`` at ``target``."""
    if patch_size < 8:
        raise ValueError(f"patch size must be at least 8 pixels, got {patch_size}")
    ds = float(target.downsample)
    size0 = max(1, round(patch_size * ds))
    level = slide.best_level_for(ds)
    lds = slide.level_downsamples[level]
    read_size = max(1, round(size0 / lds))
    if abs(read_size - patch_size) <= max(1, 0.002 * patch_size) and abs(read_size * lds - size0) <= 2:
        read_size = patch_size  # a level matches the target (up to the rounding of its downsample)
    return ReadPlan(
        level=level, level_downsample=lds, read_size=read_size, patch_size=patch_size,
        patch_size_level0=size0, downsample=ds,
    )


def tissue_grid(
    tissue: TissueMask,
    slide_size: tuple[int, int],
    patch_size_level0: int,
    min_tissue_fraction: float = 0.5,
    step_level0: int | None = None,
) -> np.ndarray:
    """Level-0 (x, y) corners of grid patches whose tissue share is at least ``min_tissue_fraction``.

    The grid starts at (0, 0) with a step of ``step_level0`` (default: the patch size, no overlap);
    tissue share is measured on the thumbnail mask with an integral image. Rows are ordered by
    y, then x, as (int64) N x 2.
    """
    if not 0.0 < min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction must be in (0, 1], got {min_tissue_fraction}")
    width0, height0 = slide_size
    p = int(patch_size_level0)
    step = int(step_level0 or p)
    if p > width0 or p > height0:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(0, width0 - p + 1, step, dtype=np.int64)
    ys = np.arange(0, height0 - p + 1, step, dtype=np.int64)
    mask = tissue.mask
    mh, mw = mask.shape
    sx, sy = tissue.scale
    integral = np.zeros((mh + 1, mw + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def bounds(starts: np.ndarray, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.round(starts / scale).astype(np.int64), 0, limit)
        hi = np.clip(np.round((starts + p) / scale).astype(np.int64), 0, limit)
        hi = np.maximum(hi, np.minimum(lo + 1, limit))
        lo = np.minimum(lo, hi - 1)
        return lo, hi

    x0, x1 = bounds(xs, sx, mw)
    y0, y1 = bounds(ys, sy, mh)
    X0, Y0 = np.meshgrid(x0, y0)
    X1, Y1 = np.meshgrid(x1, y1)
    inside = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    area = (X1 - X0) * (Y1 - Y0)
    keep = inside >= min_tissue_fraction * area
    gy, gx = np.nonzero(keep)
    return np.stack([xs[gx], ys[gy]], axis=1).astype(np.int64) if gy.size else np.zeros((0, 2), np.int64)


def resize_patch(img: Image.Image, out: int) -> Image.Image:
    """``img`` resized to ``out`` x ``out``: a box filter for an exact integer factor, else
    antialiased bilinear (both readers and the device decoder resize this way)."""
    size = img.size[0]
    if size == out:
        return img
    if size % out == 0:
        return img.reduce(size // out)  # exact integer factor: box filter, fast
    return img.resize((out, out), Image.Resampling.BILINEAR, reducing_gap=2.0)

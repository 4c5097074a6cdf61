"""Tissue segmentation on a slide thumbnail: saturation + Otsu, majority smoothing, hole filling,
minimum tissue area.

Glass is bright and grey (low HSV saturation); stained tissue is saturated. The threshold is
Otsu's on the (box-blurred) saturation histogram, never below ``min_saturation`` so a slide with
no tissue does not split its noise in two. A majority (binary median) filter removes speckle,
holes smaller than ``max_hole_area`` are filled, and connected regions smaller than
``min_area`` are dropped. Areas are in units of one patch's area at level 0, so the defaults mean
the same thing at every magnification.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .slides import Slide

__all__ = ["TissueMask", "TissueParams", "otsu_threshold", "read_thumbnail", "saturation", "segment_tissue"]

_BLOCK = 4096  # pixels per side read at once when building a thumbnail


@dataclass(frozen=True)
class TissueParams:
    """Settings of :func:`segment_tissue` (areas in patch areas, saturation in 0-255)."""

    min_saturation: int = 15
    smooth: int = 7  # majority-filter window, thumbnail pixels (odd); 0 or 1 disables it
    min_area: float = 0.5  # drop tissue regions smaller than this many patches
    max_hole_area: float = 4.0  # fill holes smaller than this many patches; larger ones stay holes

    def __post_init__(self) -> None:
        if not 0 <= self.min_saturation <= 255:
            raise ValueError(f"min_saturation must be in 0..255, got {self.min_saturation}")
        if self.min_area < 0 or self.max_hole_area < 0:
            raise ValueError("min_area and max_hole_area must be >= 0")


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over a thumbnail; ``scale`` = level-0 pixels per mask pixel (x, y)."""

    mask: np.ndarray
    thumbnail: np.ndarray
    scale: tuple[float, float]
    threshold: int

    @property
    def tissue_fraction(self) -> float:
        """Share of the thumbnail covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def read_thumbnail(slide: Slide, downsample: float) -> tuple[np.ndarray, tuple[float, float]]:
    """An RGB thumbnail about ``downsample`` times smaller than level 0, read block by block.

    Reads the pyramid level closest to (not coarser than) ``downsample``, in blocks, so a slide
    with no pyramid never has its whole level 0 in memory. Returns the image and the level-0
    pixels per thumbnail pixel along x and y.
    """
    width0, height0 = slide.dimensions
    downsample = max(1.0, float(downsample))
    tw, th = max(1, round(width0 / downsample)), max(1, round(height0 / downsample))
    level = slide.best_level_for(downsample)
    lw, lh = slide.level_dimensions[level]
    lds = slide.level_downsamples[level]
    fx, fy = tw / lw, th / lh  # thumbnail pixels per level pixel
    out = np.empty((th, tw, 3), np.uint8)
    for by in range(0, lh, _BLOCK):
        for bx in range(0, lw, _BLOCK):
            bw, bh = min(_BLOCK, lw - bx), min(_BLOCK, lh - by)
            tx0, tx1 = round(bx * fx), round((bx + bw) * fx)
            ty0, ty1 = round(by * fy), round((by + bh) * fy)
            if tx1 <= tx0 or ty1 <= ty0:
                continue
            block = slide.read_rgb((round(bx * lds), round(by * lds)), level, (bw, bh))
            if (tx1 - tx0, ty1 - ty0) != (bw, bh):
                block = np.asarray(Image.fromarray(block).resize((tx1 - tx0, ty1 - ty0), Image.Resampling.BOX))
            out[ty0:ty1, tx0:tx1] = block
    return out, (width0 / tw, height0 / th)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB uint8 image, 0-255."""
    mx = rgb.max(axis=-1).astype(np.int32)
    mn = rgb.min(axis=-1).astype(np.int32)
    return ((mx - mn) * 255 // np.maximum(mx, 1)).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising between-class variance of (<= t, > t)."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mu_total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_total * w0 / total - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0.0
    return int(np.argmax(between))


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def segment_tissue(
    thumbnail: np.ndarray, scale: tuple[float, float], patch_size_level0: float, params: TissueParams | None = None
) -> TissueMask:
    """Tissue mask of an RGB thumbnail whose pixels are ``scale`` level-0 pixels wide/high."""
    params = params or TissueParams()
    sat = saturation(thumbnail)
    blurred = ndimage.uniform_filter(sat, size=3) if min(sat.shape) >= 3 else sat
    threshold = max(otsu_threshold(blurred), int(params.min_saturation))
    mask = blurred > threshold
    if params.smooth > 1 and min(mask.shape) >= params.smooth:
        mask = ndimage.uniform_filter(mask.astype(np.float32), size=params.smooth) > 0.5
    patch_pixels = (patch_size_level0 / scale[0]) * (patch_size_level0 / scale[1])
    if params.max_hole_area > 0 and mask.any():
        holes = ndimage.binary_fill_holes(mask) & ~mask
        small_holes = holes & ~_drop_small(holes, params.max_hole_area * patch_pixels)
        mask = mask | small_holes
    mask = _drop_small(mask, params.min_area * patch_pixels)
    return TissueMask(mask=mask, thumbnail=thumbnail, scale=scale, threshold=threshold)

"""Quality-control picture of one slide: thumbnail, tissue contour (green), patch grid (blue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .tissue import TissueMask

__all__ = ["write_qc_png"]

MAX_SIDE = 1600


def write_qc_png(path: str | Path, tissue: TissueMask, coords: np.ndarray, patch_size_level0: int, title: str = "") -> Path:
    """Write the QC PNG (at most ``MAX_SIDE`` pixels a side) atomically and return its path."""
    path = Path(path)
    thumb = tissue.thumbnail
    h, w = thumb.shape[:2]
    f = min(1.0, MAX_SIDE / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    img = Image.fromarray(thumb).resize(size, Image.Resampling.BOX) if f < 1 else Image.fromarray(thumb.copy())
    mask = tissue.mask
    if f < 1:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127
    edge = mask & ~ndimage.binary_erosion(mask, iterations=1)
    edge = ndimage.binary_dilation(edge, iterations=1)
    arr = np.asarray(img).copy()
    arr[edge] = (0, 200, 0)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    sx = size[0] / (w * tissue.scale[0])  # QC pixels per level-0 pixel
    sy = size[1] / (h * tissue.scale[1])
    for x, y in np.asarray(coords):
        draw.rectangle(
            [x * sx, y * sy, (x + patch_size_level0) * sx - 1, (y + patch_size_level0) * sy - 1],
            outline=(30, 60, 220),
        )
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG", compress_level=3)  # 3x faster than the default 6, same size
    tmp.replace(path)
    return path

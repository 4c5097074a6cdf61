"""Prototype-attention heatmap: where on a slide each UMEML prototype looks.

The model's soft assignment S^p (K prototypes x M patches, design section 5) is painted over a
thumbnail of the slide at each patch's position. This needs the slide itself (openslide, from
the ``[extract]`` extra), its feature bag (h5 with ``coords``) and a UMEML checkpoint with a
pathology branch; it runs where the slide is, i.e. at the site.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

THUMBNAIL_PX = 1024
MAX_PROTOTYPE_PANELS = 4


def _patch_size_level0(path: Path, attrs: dict, coords: np.ndarray) -> float:
    """Side of a patch in level-0 pixels: the bag's attribute, else the grid step of its coords."""
    for key in ("patch_size_level0",):
        if key in attrs:
            return float(attrs[key])
    if "patch_size" in attrs and "downsample" in attrs:
        return float(attrs["patch_size"]) * float(attrs["downsample"])
    steps = np.diff(np.unique(coords[:, 0]))
    if len(steps):
        return float(steps.min())
    if "patch_size" in attrs:
        return float(attrs["patch_size"])
    raise ValueError(f"{path}: cannot tell the patch size (no patch_size_level0 / patch_size attribute, one column of coords)")


def read_bag(path: str | Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Features (M, D), level-0 coords (M, 2) and the level-0 patch size of a feature bag."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("features", "coords") if k not in f]
            if missing:
                raise ValueError(f"{path}: feature bag lacks dataset(s) {', '.join(missing)} (needed for a heatmap)")
            features = np.asarray(f["features"][:], np.float32)
            coords = np.asarray(f["coords"][:], np.float64)
            attrs = {k: f.attrs[k] for k in f.attrs}
    except OSError as err:
        raise ValueError(f"{path}: not a readable h5 feature bag ({err})") from err
    if features.ndim != 2 or coords.shape != (len(features), 2) or len(features) == 0:
        raise ValueError(f"{path}: features {features.shape} and coords {coords.shape} must be (M, D) and (M, 2) with M >= 1")
    return features, coords, _patch_size_level0(path, attrs, coords)


def prototype_assignments(model: torch.nn.Module, features: np.ndarray, coords: np.ndarray | None = None) -> np.ndarray:
    """(K, M) soft assignment of every patch to each prototype, from the model's pathology branch
    (``coords`` (M, 2) are read by a model with ``model.spatial_context``)."""
    if not hasattr(model, "patch_assignments"):
        raise ValueError(f"model {type(model).__name__} has no prototypes (a heatmap needs a UMEML checkpoint)")
    expected = model.path.proj[0].in_features if getattr(model, "use_path", False) else None
    if expected is not None and features.shape[1] != expected:
        raise ValueError(f"feature bag has {features.shape[1]}-dim features, the checkpoint expects {expected}")
    x = torch.from_numpy(features)[None]
    mask = torch.ones(1, len(features), dtype=torch.bool)
    with torch.no_grad():
        xy = None if coords is None else torch.from_numpy(np.asarray(coords, dtype=np.float32))[None]
        return model.patch_assignments(x, mask, xy)[0].float().numpy()


def prototype_heatmap(slide_path: str | Path, bag_path: str | Path, checkpoint: str | Path) -> Figure:
    """Thumbnail, the dominant prototype per patch, and the most used prototypes' attention maps."""
    from umeml.model import load

    try:
        import openslide
    except ImportError as err:  # the slide stack is the [extract] extra
        raise ValueError("a slide heatmap needs openslide: pip install -e '.[extract]'") from err
    features, coords, patch = read_bag(bag_path)
    model, _ = load(checkpoint)
    assign = prototype_assignments(model, features, coords)
    try:
        with openslide.OpenSlide(str(slide_path)) as slide:
            width, height = slide.dimensions
            thumb = np.asarray(slide.get_thumbnail((THUMBNAIL_PX, THUMBNAIL_PX)).convert("RGB"))
    except openslide.OpenSlideError as err:
        raise ValueError(f"{slide_path}: openslide cannot read it ({err})") from err
    scale = thumb.shape[1] / width
    k = assign.shape[0]
    mass = assign.sum(axis=1)
    top = np.argsort(-mass)[: min(MAX_PROTOTYPE_PANELS, k)]
    panels = 2 + len(top)
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(4.6 * cols, 4.2 * rows), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    extent = (0, thumb.shape[1], thumb.shape[0], 0)
    axes[0].imshow(thumb, extent=extent)
    axes[0].set_title(f"{Path(slide_path).name} ({width} x {height} px at level 0)", fontsize=9)

    def paint(ax, values, cmap, vmin, vmax, label):
        ax.imshow(thumb, extent=extent, alpha=0.55)
        grid = np.full(thumb.shape[:2], np.nan)
        side = max(1, int(round(patch * scale)))
        for (x, y), v in zip(coords * scale, values):
            grid[int(y): int(y) + side, int(x): int(x) + side] = v
        im = ax.imshow(grid, extent=extent, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.75, interpolation="nearest")
        bar = fig.colorbar(im, ax=ax, shrink=0.8, label=label)
        if label == "prototype index":
            bar.set_ticks(range(k))

    palette = matplotlib.colormaps["tab20"].resampled(20)
    categorical = ListedColormap([palette(i % 20) for i in range(k)])
    paint(axes[1], assign.argmax(axis=0), categorical, -0.5, k - 0.5, "prototype index")
    axes[1].set_title(f"dominant prototype per patch (K={k}, {len(features)} patches)", fontsize=9)
    for ax, j in zip(axes[2:], top):
        paint(ax, assign[j], "magma", 0.0, float(assign[j].max()) or 1.0, "soft assignment")
        ax.set_title(f"prototype {j}: {100 * mass[j] / mass.sum():.0f}% of the assignment mass", fontsize=9)
    for ax in axes:
        ax.set(xlabel="thumbnail x (px)", ylabel="thumbnail y (px)")
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig

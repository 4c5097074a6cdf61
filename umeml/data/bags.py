"""Feature bags: one HDF5 file per slide, CLAM/TRIDENT compatible, read lazily.

Format (schema version 1):
- dataset ``features``: N x D, float16 or float32 (one row per patch);
- dataset ``coords``: N x 2, integer level-0 pixel coordinates (x, y) of each patch's corner;
- attributes: ``schema_version``, ``encoder``, ``feature_dim``, ``patch_size``, ``level``,
  ``mpp``, ``magnification``, ``weights_sha256``, ``umeml_version`` and free provenance keys.
Files written by CLAM/TRIDENT (``features`` + ``coords``, few or no attributes) are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from umeml.errors import UmemlError
from umeml.rundir import atomic_write

SCHEMA_VERSION = 1
BAG_SUFFIX = ".h5"


class BagError(UmemlError):
    """A feature bag file is unreadable or breaks the format; the message names the file."""


@dataclass(frozen=True)
class BagInfo:
    """What a bag file holds, read from its header only (no feature data is loaded)."""

    path: Path
    n_patches: int
    feature_dim: int
    dtype: str
    attrs: dict[str, Any]

    @property
    def encoder(self) -> str | None:
        """Name of the encoder that produced the features, when recorded."""
        value = self.attrs.get("encoder")
        return None if value is None else str(value)


def bag_path(bag_dir: str | Path, slide_id: str) -> Path:
    """Path of the bag for ``slide_id`` under ``bag_dir``."""
    return Path(bag_dir) / f"{slide_id}{BAG_SUFFIX}"


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def inspect_bag(path: str | Path) -> BagInfo:
    """Read a bag's header and check its structure; raise :class:`BagError` naming the rule."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            for name in ("features", "coords"):
                if name not in f:
                    raise BagError(f"{path}: missing dataset '{name}' (a bag needs features and coords)")
            feats, coords = f["features"], f["coords"]
            if feats.ndim != 2:
                raise BagError(f"{path}: 'features' must be 2-D (N x D), has shape {feats.shape}")
            if coords.ndim != 2 or coords.shape[1] != 2:
                raise BagError(f"{path}: 'coords' must be N x 2, has shape {coords.shape}")
            if coords.shape[0] != feats.shape[0]:
                raise BagError(
                    f"{path}: 'features' has {feats.shape[0]} rows but 'coords' has {coords.shape[0]}"
                )
            if feats.dtype.kind != "f":
                raise BagError(f"{path}: 'features' must be float16/float32, is {feats.dtype}")
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            return BagInfo(path, int(feats.shape[0]), int(feats.shape[1]), str(feats.dtype), attrs)
    except BagError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise BagError(f"{path}: unreadable or truncated HDF5 file ({err})") from err


def read_features(
    path: str | Path, rng: np.random.Generator | None = None, max_patches: int | None = None
) -> np.ndarray:
    """Load a bag's features as float32, optionally a random subset of ``max_patches`` rows.

    Subsampling reads only the chosen rows (sorted, as h5py requires), so large bags never
    load whole when a subset is asked for.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            feats = f["features"]
            n = feats.shape[0]
            if max_patches is not None and n > max_patches:
                gen = rng if rng is not None else np.random.default_rng(0)
                idx = np.sort(gen.choice(n, size=max_patches, replace=False))
                out = feats[idx]
            else:
                out = feats[()]
    except (OSError, KeyError, ValueError) as err:
        raise BagError(f"{path}: cannot read features ({err})") from err
    out = np.asarray(out, dtype=np.float32)
    if not np.isfinite(out).all():
        raise BagError(f"{path}: 'features' contains NaN or Inf values")
    return out


def count_nonfinite(path: str | Path, chunk_rows: int = 8192) -> tuple[int, int | None]:
    """(patches whose features hold NaN or Inf, the first such row or None), read ``chunk_rows``
    rows at a time so a large bag never loads whole."""
    path = Path(path)
    bad, first = 0, None
    try:
        with h5py.File(path, "r") as f:
            feats = f["features"]
            for start in range(0, feats.shape[0], chunk_rows):
                rows = ~np.isfinite(feats[start:start + chunk_rows]).all(axis=1)
                if rows.any():
                    first = int(start + np.argmax(rows)) if first is None else first
                    bad += int(rows.sum())
    except (OSError, KeyError, ValueError) as err:
        raise BagError(f"{path}: cannot read features ({err})") from err
    return bad, first


def read_coords(path: str | Path) -> np.ndarray:
    """Load a bag's patch coordinates (N x 2, level-0 pixels)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            coords = np.asarray(f["coords"][()])
    except (OSError, KeyError, ValueError) as err:
        raise BagError(f"{path}: cannot read coords ({err})") from err
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise BagError(f"{path}: 'coords' must be N x 2, has shape {coords.shape}")
    return coords


def write_bag(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any] | None = None,
    dtype: str = "float16",
) -> Path:
    """Write a bag atomically (temporary file, then rename), so a crash never leaves half a bag."""
    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords)
    if features.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise ValueError(
            f"{path}: features must be N x D and coords N x 2; got {features.shape} and {coords.shape}"
        )

    def write(tmp: Path) -> None:
        with BagWriter(tmp, feature_dim=features.shape[1], attrs=attrs, dtype=dtype) as writer:
            writer.append(features, coords)

    return atomic_write(path, write)


class BagWriter:
    """Streams patches into a bag chunk by chunk, so a 10,000-patch bag never sits in memory."""

    def __init__(self, path: str | Path, feature_dim: int, attrs: dict[str, Any] | None = None, dtype: str = "float16"):
        from umeml import __version__

        self.path = Path(path)
        self._file = h5py.File(self.path, "w")
        chunk = max(1, min(1024, (1 << 20) // max(1, feature_dim * np.dtype(dtype).itemsize)))
        self._feats = self._file.create_dataset(
            "features", shape=(0, feature_dim), maxshape=(None, feature_dim), dtype=dtype, chunks=(chunk, feature_dim)
        )
        self._coords = self._file.create_dataset(
            "coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(max(chunk, 256), 2)
        )
        base = {"schema_version": SCHEMA_VERSION, "feature_dim": feature_dim, "umeml_version": __version__}
        for key, value in {**base, **(attrs or {})}.items():
            if value is not None:
                self._file.attrs[key] = value

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        """Add rows of features with their coordinates."""
        n0, n = self._feats.shape[0], features.shape[0]
        self._feats.resize(n0 + n, axis=0)
        self._coords.resize(n0 + n, axis=0)
        self._feats[n0:] = features
        self._coords[n0:] = coords

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

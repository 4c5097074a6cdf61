"""Patch readers: openslide or the raw-tile reader, chosen per slide, and a slide's patch chunks.

``--reader auto`` (the default) reads a slide's patches with :class:`~.rawtiles.RawTileReader`
when the pyramid level the plan reads is a JPEG-tiled TIFF page it can decode, and through
openslide otherwise; ``raw`` insists on the raw reader (a slide it cannot read fails, saying why)
and ``openslide`` always uses openslide. The choice and its reason go into the bag's provenance.
Both readers resize in the same way (:func:`.grid.resize_patch`), so their patches agree to within the
JPEG decoder's rounding (PSNR >= 35 dB is tested).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .grid import ReadPlan, resize_patch
from .rawtiles import RawTileReader, TileChunk, probe_raw_level
from .slides import Slide, SlideError, open_slide

__all__ = ["READERS", "OpenSlideReader", "PatchChunks", "PatchReader", "ReaderChoice", "choose_reader"]

READERS = ("auto", "raw", "openslide")


class OpenSlideReader:
    """Reads patches through openslide ``read_region`` (any format openslide opens).

    Picklable; each process opens its own openslide handle on first use (handles are never
    shared across processes).
    """

    name = "openslide"
    decoder = "openslide"

    def __init__(self, path: str | Path, level: int, read_size: int, out_size: int, assume_mpp: float | None = None):
        self.path = Path(path)
        self.level, self.read_size, self.out_size = int(level), int(read_size), int(out_size)
        self.assume_mpp = assume_mpp
        self._slide: Slide | None = None
        self._pid: int | None = None

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.path, assume_mpp=self.assume_mpp)
            self._pid = os.getpid()
        return self._slide

    def read_patch(self, x: int, y: int) -> np.ndarray:
        """The patch at level-0 (x, y) as an out_size x out_size x 3 uint8 array."""
        size = self.read_size
        img = self._handle().read_image((x, y), self.level, (size, size))
        return np.asarray(resize_patch(img, self.out_size))

    def close(self) -> None:
        """Release the openslide handle (reopened when used again)."""
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide, self._pid = None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None  # never ship an open handle to a worker
        return state


PatchReader = OpenSlideReader | RawTileReader


@dataclass(frozen=True)
class ReaderChoice:
    """The reader picked for one slide, and why (``reason`` is set when openslide was the fallback)."""

    reader: PatchReader
    reason: str = ""

    @property
    def provenance(self) -> dict[str, str]:
        """Bag attributes naming the reader, its decoder and any fallback reason."""
        out = {"reader": self.reader.name, "reader_decode": self.reader.decoder}
        if isinstance(self.reader, RawTileReader):
            out["reader_level"] = self.reader.raw.describe()
        if self.reason:
            out["reader_fallback"] = self.reason
        return out


def choose_reader(slide: Slide, plan: ReadPlan, out_size: int, reader: str = "auto",
                  assume_mpp: float | None = None) -> ReaderChoice:
    """The patch reader for ``slide`` read by ``plan`` (``reader``: auto, raw or openslide).

    Raises :class:`SlideError` when ``raw`` is asked for and the slide's level cannot be read raw.
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    fallback = OpenSlideReader(slide.path, plan.level, plan.read_size, out_size, assume_mpp=assume_mpp)
    if reader == "openslide":
        return ReaderChoice(fallback)
    raw = probe_raw_level(slide.path, slide.vendor, slide.level_dimensions, plan.level)
    if isinstance(raw, str):
        if reader == "raw":
            raise SlideError(f"{slide.path}: the raw-tile reader cannot read this slide: {raw}; "
                             "use --reader auto (falls back to openslide) or --reader openslide")
        return ReaderChoice(fallback, reason=raw)
    return ReaderChoice(RawTileReader(raw, plan.level_downsample, plan.read_size, out_size, slide.background))


class PatchChunks(Dataset):
    """Item ``i`` = the ``i``-th chunk of ``chunk_size`` patches as a uint8 tensor (n x S x S x 3), and ``i``.

    Chunks are smaller than inference batches, so every reader process has work even on a
    slide of a few batches, and the main process assembles batches from them. Patches are read
    by ``reader`` (default: openslide at the planned level) and resized to ``out_size``;
    :meth:`tile_chunk` gives a chunk's compressed tiles instead, for decoding on the device.
    """

    def __init__(self, path: str | Path, coords: np.ndarray, plan: ReadPlan, out_size: int, chunk_size: int,
                 assume_mpp: float | None = None, reader: PatchReader | None = None):
        self.path = Path(path)
        self.coords = np.asarray(coords, np.int64)
        self.plan = plan
        self.out_size = int(out_size)
        self.chunk_size = int(chunk_size)
        self.reader = reader or OpenSlideReader(path, plan.level, plan.read_size, out_size, assume_mpp=assume_mpp)

    def __len__(self) -> int:
        return math.ceil(len(self.coords) / self.chunk_size)

    def chunk_coords(self, index: int) -> np.ndarray:
        """Level-0 corners of chunk ``index``'s patches."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.coords[index * self.chunk_size : (index + 1) * self.chunk_size]

    def read_patch(self, x: int, y: int) -> np.ndarray:
        """One patch as an out_size x out_size x 3 uint8 array."""
        return self.reader.read_patch(x, y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        chunk = self.chunk_coords(index)
        out = np.empty((len(chunk), self.out_size, self.out_size, 3), np.uint8)
        for k, (x, y) in enumerate(chunk):
            out[k] = self.read_patch(int(x), int(y))
        return torch.from_numpy(out), index

    def tile_chunk(self, index: int) -> TileChunk:
        """Chunk ``index``'s compressed tiles (raw reader only), for decoding on the device."""
        if not isinstance(self.reader, RawTileReader):
            raise TypeError("tile chunks need the raw-tile reader")
        return self.reader.tile_chunk(self.chunk_coords(index))

    def close(self) -> None:
        """Release the reader's file handle."""
        self.reader.close()

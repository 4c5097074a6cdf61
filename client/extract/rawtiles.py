"""Raw-tile reading of tiled JPEG TIFF/SVS pyramids, beside openslide.

openslide decodes every tile a region covers at full resolution into premultiplied ARGB, and the
pipeline then converts and shrinks it; for a 40x scan read at 20x that is most of the reading
time. A JPEG-tiled Aperio SVS or generic tiled TIFF can be read more directly:
:func:`probe_raw_level` maps an openslide pyramid level to its TIFF page (tifffile) and checks the
page is one this reader can decode, and :class:`RawTileReader` reads the compressed tiles a patch
covers by byte range, splices the page's JPEGTables into each tile, makes the colour
interpretation explicit (the TIFF Photometric tag, RGB or YCbCr, which openslide follows over the
JPEG's own markers), decodes at the scale the target needs (libjpeg's scaled DCT: 1/2, 1/4, 1/8)
and assembles and resizes the patch. For decoding on the GPU it hands out the spliced streams of a
chunk of patches instead (:meth:`RawTileReader.tile_chunk`, decoded by :mod:`.devicedecode`).

What it cannot read (JPEG 2000, LZW and other compressions, vendor formats such as .ndpi/.mrxs,
levels tifffile does not map to openslide's) comes back from :func:`probe_raw_level` as a reason
string, and the caller reads that slide through openslide.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .grid import resize_patch
from .slides import SlideError

__all__ = [
    "RAW_SUFFIXES",
    "RAW_VENDORS",
    "RawLevel",
    "RawTileReader",
    "TileChunk",
    "decode_scale",
    "jpeg_header",
    "probe_raw_level",
    "shift_bilinear",
    "splice_jpeg",
]

RAW_VENDORS = ("aperio", "generic-tiff")  # openslide vendors whose levels are plain tiled TIFF pages
RAW_SUFFIXES = (".svs", ".tif", ".tiff")
_SOI, _EOI, _SOS = b"\xff\xd8", b"\xff\xd9", 0xDA
_APP0, _APP14, _DQT, _DHT = 0xE0, 0xEE, 0xDB, 0xC4
_SOF_OK = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman (8-bit); not lossless/arithmetic
# colour markers: JFIF means YCbCr to every decoder; Adobe APP14 with transform 0 means RGB
_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_ON_PIXEL = 1e-3  # a level position this close to a pixel is taken as on it
_CACHE_TILES = 64  # decoded tiles kept per reader: neighbouring patches that are not tile-aligned share tiles


def _segments(data: bytes, start: int = 2) -> list[tuple[int, int, int]]:
    """(marker, start, end) of the marker segments from ``start`` up to and including SOS
    (whose segment runs to the end of ``data``). Raises ValueError for a malformed header."""
    out = []
    pos, n = start, len(data)
    while True:
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 2 <= n and data[pos : pos + 2] == _EOI:  # a tables-only stream ends here
            return out
        if pos + 4 > n or data[pos] != 0xFF:
            raise ValueError(f"malformed JPEG header at byte {pos}")
        marker = data[pos + 1]
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == _SOS:
            out.append((marker, pos, n))
            return out
        if end > n:
            raise ValueError("truncated JPEG header")
        out.append((marker, pos, end))
        pos = end


def _is_colour_marker(data: bytes, marker: int, start: int) -> bool:
    return (marker == _APP0 and data[start + 4 : start + 9] == b"JFIF\x00") or (
        marker == _APP14 and data[start + 4 : start + 9] == b"Adobe"
    )


def jpeg_header(tables: bytes | None, photometric: str) -> bytes:
    """The bytes every tile of a page starts with once spliced: SOI, the colour marker the TIFF
    Photometric tag implies (``rgb``: Adobe, no transform; ``ycbcr``: JFIF), then the page's
    JPEGTables (quantisation and Huffman tables) without their SOI/EOI."""
    colour = _ADOBE_RGB if photometric == "rgb" else _JFIF
    if not tables:
        return _SOI + colour
    if tables[:2] != _SOI:
        raise ValueError("JPEGTables does not start with a JPEG SOI marker")
    kept = [tables[s:e] for m, s, e in _segments(tables) if not _is_colour_marker(tables, m, s)]
    return _SOI + colour + b"".join(kept)


def splice_jpeg(header: bytes, tile: bytes) -> bytes:
    """A complete JPEG stream from a TIFF tile: ``header`` (see :func:`jpeg_header`) and the
    tile's own segments without its SOI and without any colour marker of its own (the TIFF
    Photometric tag decides, as it does for openslide)."""
    if tile[:2] != _SOI:
        raise ValueError("tile data does not start with a JPEG SOI marker")
    segs = _segments(tile)
    if not any(_is_colour_marker(tile, m, s) for m, s, _e in segs):
        return header + tile[2:]
    return header + b"".join(tile[s:e] for m, s, e in segs if not _is_colour_marker(tile, m, s))


def _frame(stream: bytes) -> tuple[int, int, int, int, int]:
    """(SOF marker, precision, height, width, components) of a complete JPEG stream."""
    for marker, start, _end in _segments(stream):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            p = stream[start + 4 :]
            return marker, p[0], int.from_bytes(p[1:3], "big"), int.from_bytes(p[3:5], "big"), p[5]
    raise ValueError("no SOF marker in the JPEG stream")


def decode_tile_image(stream: bytes, width: int, height: int, photometric: str, scale: int = 1) -> Image.Image:
    """Decode a complete JPEG stream of a ``width`` x ``height`` tile at 1/``scale`` (libjpeg's
    scaled DCT) into an RGB image; the colour space is the TIFF photometric's, whatever the
    stream's markers say (as openslide does)."""
    size = (-(-width // scale), -(-height // scale))
    jpegmode = "RGB" if photometric == "rgb" else "YCbCr"
    return Image.frombytes("RGB", size, stream, "jpeg", "RGB", jpegmode, scale, 0)


def decode_tile(stream: bytes, width: int, height: int, photometric: str, scale: int = 1) -> np.ndarray:
    """:func:`decode_tile_image` as an H x W x 3 uint8 array."""
    return np.asarray(decode_tile_image(stream, width, height, photometric, scale))


@dataclass(frozen=True)
class RawLevel:
    """One pyramid level's tiles as stored in the file: where each is and how to decode it."""

    path: str
    level: int
    page: int
    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # int64 per tile, row-major
    counts: np.ndarray  # bytes per tile; 0 = a missing tile (painted with the background)
    header: bytes  # see jpeg_header
    photometric: str  # "rgb" or "ycbcr"

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)

    def describe(self) -> str:
        """A short description for the provenance attributes and logs."""
        tables = "JPEGTables" if len(self.header) > len(_SOI + _JFIF) else "no JPEGTables"
        return f"page {self.page}, {self.tile_width}x{self.tile_height} JPEG tiles, {self.photometric}, {tables}"


def _page_reason(page, level: int) -> str | None:
    """Why the raw reader cannot read this page, or None."""
    if not page.is_tiled:
        return f"level {level} is not tiled"
    if int(page.compression) != 7:
        return f"level {level} is compressed with {page.compression.name} (the raw reader reads JPEG only)"
    if int(page.photometric) not in (2, 6):
        return f"level {level} has photometric {page.photometric.name} (the raw reader reads RGB and YCbCr)"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or int(page.planarconfig) != 1 or page.extrasamples:
        return f"level {level} is not 8-bit RGB with interleaved samples"
    if getattr(page, "tiledepth", 1) != 1 or page.tilewidth % 16 or page.tilelength % 16:
        return f"level {level} has a tile shape the raw reader does not read"
    tiles = -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength)
    if len(page.dataoffsets) != tiles or len(page.databytecounts) != tiles:
        return f"level {level} has {len(page.dataoffsets)} tiles, expected {tiles}"
    return None


def _check_first_tile(raw: RawLevel) -> str | None:
    """Decode the level's first stored tile the way the reader will; None when that works."""
    stored = np.flatnonzero(raw.counts)
    if not stored.size:
        return None
    i = int(stored[0])
    with open(raw.path, "rb") as f:
        f.seek(int(raw.offsets[i]))
        data = f.read(int(raw.counts[i]))
    try:
        stream = splice_jpeg(raw.header, data)
        marker, precision, height, width, components = _frame(stream)
        if marker not in _SOF_OK or precision != 8 or components != 3:
            return (f"level {raw.level} holds JPEG of a kind the raw reader does not decode "
                    f"(SOF {marker:#x}, {precision}-bit, {components} components)")
        if (width, height) != (raw.tile_width, raw.tile_height):
            return f"level {raw.level} tiles are {width}x{height} JPEGs in {raw.tile_width}x{raw.tile_height} TIFF tiles"
        decode_tile(stream, raw.tile_width, raw.tile_height, raw.photometric)
    except (ValueError, OSError) as err:
        return f"its first tile at level {raw.level} does not decode ({err})"
    return None


def _tile_grid(page) -> tuple[int, int]:
    return -(-page.imagewidth // page.tilewidth), -(-page.imagelength // page.tilelength)


def _aperio_missing(pages: list, level: int) -> set[int]:
    """Tiles of ``level`` that openslide's Aperio reader treats as missing: zero-length tiles,
    and (level by level) the tiles covering a missing tile of the finer level, which it renders
    from that finer level instead of decoding."""
    missing: set[int] = set()
    for i in range(level + 1):
        across, down = _tile_grid(pages[i])
        own = set(np.flatnonzero(np.asarray(pages[i].databytecounts) == 0).tolist())
        if i and missing:
            prev_across, prev_down = _tile_grid(pages[i - 1])
            cx = max(1, math.floor(prev_across / across + 0.5))  # as openslide rounds (half away from 0)
            cy = max(1, math.floor(prev_down / down + 0.5))
            own |= {(t // prev_across) // cy * across + (t % prev_across) // cx for t in missing}
        missing = own
    return missing


def _level_pages(tf, level_dimensions: tuple[tuple[int, int], ...], level: int) -> list | str:
    """The tiled TIFF page of each openslide level up to ``level`` (matched by pixel size), or why not."""
    out = []
    for i in range(level + 1):
        dims = tuple(level_dimensions[i])
        pages = [(k, p) for k, p in enumerate(tf.pages) if p.is_tiled and (p.imagewidth, p.imagelength) == dims]
        if len(pages) != 1:
            return f"{len(pages)} tiled TIFF pages have the {dims[0]}x{dims[1]} pixels of level {i}"
        out.append(pages[0])
    return out


def _missing_reason(vendor: str, pages: list, level: int) -> str | None:
    """Why missing (zero-length) tiles keep this level from the raw reader, or None. A missing
    tile of level 0 is blank for openslide too (painted with the background); others are not."""
    if vendor == "aperio":
        missing = _aperio_missing(pages, level)
        if level and missing:
            return (f"{len(missing)} tiles of level {level} are missing or cover missing tiles, which openslide "
                    f"renders from level {level - 1}")
        return None
    if (np.asarray(pages[level].databytecounts) == 0).any():
        return f"level {level} has zero-length tiles"
    return None


def probe_raw_level(path: str | Path, vendor: str, level_dimensions: tuple[tuple[int, int], ...], level: int) -> RawLevel | str:
    """The raw-tile description of openslide pyramid ``level`` of a slide, or why it cannot be read.

    Only vendors whose levels are plain tiled TIFF pages (Aperio, generic TIFF) and files with a
    TIFF suffix are tried; each level is the one tiled page with the level's pixel size, and it
    must hold 8-bit 3-sample JPEG tiles whose first tile decodes, without tiles that openslide
    would render from another level.
    """
    path = Path(path)
    if path.suffix.lower() not in RAW_SUFFIXES or vendor not in RAW_VENDORS:
        return f"openslide vendor '{vendor}' ({path.suffix or 'no suffix'}) is read through openslide"
    try:
        import tifffile
    except ImportError as err:
        return f"tifffile is not installed ({err}); pip install 'umeml[extract]'"
    try:
        with tifffile.TiffFile(path) as tf:
            pages = _level_pages(tf, level_dimensions, level)
            if isinstance(pages, str):
                return pages
            index, page = pages[level]
            reason = _page_reason(page, level) or _missing_reason(vendor, [p for _, p in pages], level)
            if reason:
                return reason
            photometric = "rgb" if int(page.photometric) == 2 else "ycbcr"
            raw = RawLevel(
                path=str(path), level=level, page=index, width=page.imagewidth, height=page.imagelength,
                tile_width=page.tilewidth, tile_height=page.tilelength,
                offsets=np.asarray(page.dataoffsets, np.int64), counts=np.asarray(page.databytecounts, np.int64),
                header=jpeg_header(page.jpegtables, photometric), photometric=photometric,
            )
    except Exception as err:  # noqa: BLE001 - whatever tifffile trips on, openslide may still read the slide
        return f"tifffile cannot read it ({type(err).__name__}: {err})"
    return _check_first_tile(raw) or raw


def decode_scale(read_size: int, out_size: int, tile_width: int, tile_height: int) -> int:
    """The JPEG decode scale (1, 2, 4 or 8) for patches of ``read_size`` level pixels resized to
    ``out_size``: the largest that still leaves at least ``out_size`` pixels (never decode below
    the output) and divides the read and tile sizes."""
    for k in (8, 4, 2):
        if read_size // k >= out_size and not (read_size % k or tile_width % k or tile_height % k):
            return k
    return 1


def shift_bilinear(region: np.ndarray, rx: float, ry: float) -> np.ndarray:
    """An (n - 1)-pixel square sampled ``rx``, ``ry`` of a pixel into an n-pixel ``region``, by
    bilinear interpolation (what openslide's cairo does for a fractional level position)."""
    a = region.astype(np.float32)
    top = a[:-1, :-1] * (1 - rx) + a[:-1, 1:] * rx
    bottom = a[1:, :-1] * (1 - rx) + a[1:, 1:] * rx
    return np.clip(np.rint(top * (1 - ry) + bottom * ry), 0, 255).astype(np.uint8)


@dataclass
class TileChunk:
    """The compressed tiles a chunk of patches covers, for decoding on the device.

    ``data`` holds the tiles' complete JPEG streams end to end (``lengths`` each); ``grid[p]`` is
    patch p's gy x gx tiles (an index into the streams, -1 for background); ``origin[p]`` the
    (x, y) of the patch's corner inside its grid and ``valid[p]`` the (width, height) of the read
    inside the level image, in level pixels; ``frac[p]`` the fraction of a pixel the corner lies
    beyond ``origin`` (then one more pixel is read and the patch interpolated).
    """

    data: torch.Tensor
    lengths: torch.Tensor
    grid: torch.Tensor
    origin: torch.Tensor
    valid: torch.Tensor
    frac: torch.Tensor
    read_size: int
    out_size: int
    tile_width: int
    tile_height: int
    photometric: str
    background: tuple[int, int, int]

    def __len__(self) -> int:
        return int(self.grid.shape[0])

    def pin_memory(self) -> TileChunk:
        """Pinned copies of the tensors (the DataLoader calls this when it pins memory)."""
        return dataclasses.replace(self, data=self.data.pin_memory())


class RawTileReader:
    """Reads patches of one slide's pyramid level from its compressed tiles (see the module doc).

    Picklable; each process opens its own file descriptor on first use. ``read_size`` level
    pixels are read per patch and resized to ``out_size``; ``level_downsample`` maps level-0
    coordinates to the level (a fractional level position is rounded to the nearest pixel, where
    openslide interpolates).
    """

    name = "raw"

    def __init__(self, raw: RawLevel, level_downsample: float, read_size: int, out_size: int,
                 background: tuple[int, int, int] = (255, 255, 255)):
        self.raw = raw
        self.level_downsample = float(level_downsample)
        self.read_size, self.out_size = int(read_size), int(out_size)
        self.background = tuple(int(c) for c in background)
        self.scale = decode_scale(self.read_size, self.out_size, raw.tile_width, raw.tile_height)
        self._fd: int | None = None
        self._pid: int | None = None
        self._cache: OrderedDict[tuple[int, int, int], Image.Image | None] = OrderedDict()

    @property
    def decoder(self) -> str:
        """How this reader decodes, for the provenance attributes."""
        return f"pil-scaled-dct-1/{self.scale}" if self.scale > 1 else "pil"

    # -- bytes -------------------------------------------------------------------------------
    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.raw.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def tile_stream(self, col: int, row: int) -> bytes | None:
        """The complete JPEG stream of tile (col, row), or None for a missing (empty) tile."""
        i = row * self.raw.tiles_across + col
        count = int(self.raw.counts[i])
        if count == 0:
            return None
        data = os.pread(self._file(), count, int(self.raw.offsets[i]))
        if len(data) != count:
            raise SlideError(f"{self.raw.path}: tile {col},{row} of level {self.raw.level} is cut short (file truncated?)")
        try:
            return splice_jpeg(self.raw.header, data)
        except ValueError as err:
            raise SlideError(f"{self.raw.path}: cannot decode JPEG tile {col},{row} of level {self.raw.level} ({err})") from err

    def _tile(self, col: int, row: int, scale: int) -> Image.Image | None:
        key = (col, row, scale)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        stream = self.tile_stream(col, row)
        tile = None
        if stream is not None:
            try:
                tile = decode_tile_image(stream, self.raw.tile_width, self.raw.tile_height, self.raw.photometric, scale)
            except (OSError, ValueError) as err:
                raise SlideError(f"{self.raw.path}: cannot decode JPEG tile {col},{row} of level {self.raw.level} "
                                 f"({err})") from err
        self._cache[key] = tile
        if len(self._cache) > _CACHE_TILES:
            self._cache.popitem(last=False)
        return tile

    # -- patches -----------------------------------------------------------------------------
    def level_position(self, x: int, y: int) -> tuple[int, int, float, float]:
        """The level pixel at or before level-0 (x, y), and the fractions of a pixel beyond it
        (non-zero when the level's downsample is not an integer; openslide interpolates them)."""
        fx, fy = x / self.level_downsample, y / self.level_downsample
        ix, iy = math.floor(fx + _ON_PIXEL), math.floor(fy + _ON_PIXEL)
        rx, ry = fx - ix, fy - iy
        return ix, iy, (rx if rx > _ON_PIXEL else 0.0), (ry if ry > _ON_PIXEL else 0.0)

    def _tiles_covering(self, lx: int, ly: int, size: int) -> tuple[range, range]:
        r = self.raw
        cols = range(max(0, lx // r.tile_width), min(r.tiles_across, -(-(lx + size) // r.tile_width)))
        rows = range(max(0, ly // r.tile_height), min(r.tiles_down, -(-(ly + size) // r.tile_height)))
        return cols, rows

    def region_image(self, lx: int, ly: int, size: int | None = None, scale: int | None = None) -> Image.Image:
        """The ``size`` (default read_size) square at level pixel (lx, ly), decoded at 1/``scale``
        (default the reader's, less when the corner is not a multiple of it), side / k pixels a side.
        Tiles are pasted as Pillow images (C copies, clipped to the square); what lies outside the
        level image or on a missing tile is the background."""
        r, k = self.raw, self.scale if scale is None else scale
        size = self.read_size if size is None else size
        while k > 1 and (lx % k or ly % k or size % k):
            k //= 2
        out = Image.new("RGB", (size // k, size // k), self.background)
        tw, th = r.tile_width // k, r.tile_height // k
        x_end, y_end = -(-min(lx + size, r.width) // k), -(-min(ly + size, r.height) // k)  # image edge
        cols, rows = self._tiles_covering(lx, ly, size)
        for row in rows:
            for col in cols:
                tile = self._tile(col, row, k)
                if tile is None:
                    continue
                if (col + 1) * tw > x_end or (row + 1) * th > y_end:  # an edge tile: drop its padding
                    tile = tile.crop((0, 0, min(tw, x_end - col * tw), min(th, y_end - row * th)))
                out.paste(tile, (col * tw - lx // k, row * th - ly // k))
        return out

    def read_region(self, lx: int, ly: int, size: int | None = None, scale: int | None = None) -> np.ndarray:
        """:meth:`region_image` as an array."""
        return np.asarray(self.region_image(lx, ly, size, scale))

    def read_patch(self, x: int, y: int) -> np.ndarray:
        """The patch at level-0 (x, y) as an out_size x out_size x 3 uint8 array."""
        lx, ly, rx, ry = self.level_position(x, y)
        if rx or ry:  # between level pixels: one more pixel, full scale, interpolated as openslide does
            region = Image.fromarray(shift_bilinear(self.read_region(lx, ly, self.read_size + 1, scale=1), rx, ry))
        else:
            region = self.region_image(lx, ly)
        return np.asarray(resize_patch(region, self.out_size))

    def tile_chunk(self, coords: np.ndarray) -> TileChunk:
        """The compressed tiles of the patches at level-0 ``coords`` (n x 2), for the device."""
        r, size = self.raw, self.read_size
        gx, gy = -(-size // r.tile_width) + 1, -(-size // r.tile_height) + 1  # tiles size + 1 pixels can touch
        grid = np.full((len(coords), gy, gx), -1, np.int64)
        origin, valid = np.zeros((len(coords), 2), np.int64), np.zeros((len(coords), 2), np.int64)
        frac = np.zeros((len(coords), 2), np.float32)
        streams: list[bytes] = []
        seen: dict[tuple[int, int], int] = {}
        for p, (x, y) in enumerate(coords):
            lx, ly, rx, ry = self.level_position(int(x), int(y))
            span = size + (1 if rx or ry else 0)
            c0, r0 = lx // r.tile_width, ly // r.tile_height
            origin[p], frac[p] = (lx - c0 * r.tile_width, ly - r0 * r.tile_height), (rx, ry)
            valid[p] = (max(0, min(span, r.width - lx)), max(0, min(span, r.height - ly)))
            cols, rows = self._tiles_covering(lx, ly, span)
            for row in rows:
                for col in cols:
                    if (col, row) not in seen:
                        stream = self.tile_stream(col, row)
                        seen[(col, row)] = -1 if stream is None else len(streams)
                        if stream is not None:
                            streams.append(stream)
                    grid[p, row - r0, col - c0] = seen[(col, row)]
        data = np.frombuffer(b"".join(streams), np.uint8) if streams else np.zeros(0, np.uint8)
        return TileChunk(
            data=torch.from_numpy(data.copy()), lengths=torch.tensor([len(s) for s in streams], dtype=torch.int64),
            grid=torch.from_numpy(grid), origin=torch.from_numpy(origin), valid=torch.from_numpy(valid),
            frac=torch.from_numpy(frac), read_size=size, out_size=self.out_size, tile_width=r.tile_width,
            tile_height=r.tile_height, photometric=r.photometric, background=self.background,
        )

    def close(self) -> None:
        """Close the file descriptor (the reader reopens it when used again)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, None
        self._cache.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"], state["_pid"], state["_cache"] = None, None, OrderedDict()  # each process opens its own
        return state

"""Synthetic whole-slide images for the extraction tests and the extraction benchmark.

The slides are written with tifffile, so the tests need no downloaded data:
- :func:`write_pyramidal_tiff`: a generic tiled, pyramidal TIFF (deflate tiles), with the pixel
  size in the TIFF resolution tags (openslide reports it as ``openslide.mpp-x``), or without it;
- :func:`write_aperio_svs`: an Aperio-style SVS (JPEG tiles, an Aperio ``ImageDescription`` with
  ``AppMag`` and ``MPP``, a thumbnail page and reduced levels), which openslide opens as ``aperio``;
- :func:`write_jpeg_pyramid`: the same with tiles encoded here, as scanners write them: in either
  photometric case (RGB-coded tiles with an Adobe marker, or YCbCr 4:2:0), with the tables in the
  page's JPEGTables (abbreviated tiles) or in every tile, edge tiles, missing (empty) tiles;
- :func:`write_large_svs`: a large Aperio-style SVS from a pool of tiles, for the benchmark.

Tissue is drawn as textured, saturated rectangles on a near-white background, so the expected
patch count of a grid is known exactly when the rectangles are aligned to the patch grid.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

Rect = tuple[int, int, int, int]  # x, y, width, height in level-0 pixels

BACKGROUND = (236, 234, 238)
TISSUE = (170, 80, 160)


def make_slide_image(
    width: int, height: int, rects: Sequence[Rect], seed: int = 0, noise: int = 12
) -> np.ndarray:
    """An RGB uint8 image: near-white glass with textured pink/purple tissue in ``rects``."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND
    img += rng.integers(0, 4, size=img.shape, dtype=np.uint8)
    for x, y, w, h in rects:
        block = np.asarray(TISSUE, np.int16) + rng.integers(-noise, noise + 1, size=(h, w, 3), dtype=np.int16)
        # a little structure (nuclei-like dark dots) so the encoder sees more than flat colour
        dots = rng.random((h, w)) < 0.02
        block[dots] -= 60
        img[y : y + h, x : x + w] = np.clip(block, 0, 255).astype(np.uint8)
    return img


def tissue_patch_count(rects: Sequence[Rect], patch_px: int) -> int:
    """Patches of ``patch_px`` level-0 pixels fully covered by the (grid-aligned) rectangles."""
    return sum((w // patch_px) * (h // patch_px) for _x, _y, w, h in rects)


def _pil_jpeg_encode(
    data: np.ndarray,
    level: int | None = None,
    colorspace: str | None = None,
    outcolorspace: str | None = None,
    subsampling: tuple[int, int] | None = None,
    **_: object,
) -> bytes:
    """JPEG tile encoder for tifffile when the optional imagecodecs package is absent."""
    arr = np.asarray(data)
    arr = arr.reshape(arr.shape[-3:])
    mode = {(1, 1): 0, (2, 1): 1, (2, 2): 2}.get(tuple(subsampling or (2, 2)), 2)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(level or 90), subsampling=mode)
    return buf.getvalue()


@contextlib.contextmanager
def _jpeg_encoder() -> Iterator[None]:
    """Make tifffile able to write JPEG tiles: imagecodecs if installed, else Pillow."""
    try:
        import imagecodecs  # noqa: F401

        yield
        return
    except ImportError:
        pass
    codecs = tifffile.TIFF.COMPRESSORS._codecs  # tifffile's cache of encoders by compression tag
    previous = codecs.get(7)
    codecs[7] = _pil_jpeg_encode
    try:
        yield
    finally:
        if previous is None:
            codecs.pop(7, None)
        else:
            codecs[7] = previous


def _downsampled(img: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None = 0.5,
    downsamples: Sequence[int] = (1, 2, 4),
    tile: int = 256,
) -> Path:
    """A generic pyramidal tiled TIFF; ``mpp=None`` leaves out the resolution (no pixel size)."""
    path = Path(path)
    with tifffile.TiffWriter(path) as tw:
        for ds in downsamples:
            level = _downsampled(image, ds)
            kwargs: dict = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * ds)
                kwargs = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                subfiletype=0 if ds == 1 else 1,
                metadata=None,
                **kwargs,
            )
    return path


def write_aperio_svs(
    path: str | Path,
    image: np.ndarray,
    mpp: float = 0.5,
    app_mag: float = 20,
    downsamples: Sequence[int] = (1, 4),
    tile: int = 256,
    quality: int = 90,
) -> Path:
    """An Aperio-style SVS: JPEG-tiled levels, a stripped thumbnail page second, Aperio description."""
    path = Path(path)
    h, w = image.shape[:2]
    desc = (
        f"Aperio Image Library v12.0.15 \n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
        f"|AppMag = {app_mag:g}|StripeWidth = 2040|ScanScope ID = SS0000|Filename = synthetic"
        f"|MPP = {mpp:g}|Left = 25.0|Top = 18.0"
    )
    # every pyramid level: tiled JPEG at the slide's quality
    level_args = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": quality},
                  "photometric": "rgb", "metadata": None}
    with _jpeg_encoder(), tifffile.TiffWriter(path) as tw:
        tw.write(image, description=desc, **level_args)
        thumb_ds = max(1, max(h, w) // 256)
        thumb = _downsampled(image, thumb_ds)
        tw.write(thumb, photometric="rgb", metadata=None,
                 description=f"Aperio Image Library v12.0.15 \n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]}")
        for ds in downsamples[1:]:
            level = _downsampled(image, ds)
            tw.write(level, description=f"Aperio Image Library v12.0.15 \n{w}x{h} -> {level.shape[1]}x{level.shape[0]}",
                     **level_args)
    return path


def _encode_tile(arr: np.ndarray, photometric: str, quality: int) -> bytes:
    """One tile as a complete JPEG: ``rgb`` = RGB-coded (Adobe APP14, transform 0, no chroma
    subsampling), ``ycbcr`` = the usual JFIF YCbCr 4:2:0."""
    buf = io.BytesIO()
    if photometric == "rgb":
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=0, keep_rgb=True)
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def split_jpeg_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """(tables, abbreviated tile): the DQT/DHT segments as a tables-only stream, and the JPEG without them."""
    pos, tables, rest = 2, [], []
    while True:
        marker = jpeg[pos + 1]
        if marker == 0xDA:  # SOS: the scan runs to the end
            rest.append(jpeg[pos:])
            break
        end = pos + 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        (tables if marker in (0xDB, 0xC4) else rest).append(jpeg[pos:end])
        pos = end
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest)


def _level_tiles(level: np.ndarray, tile: int, photometric: str, quality: int, missing: Sequence[int]) -> list[bytes]:
    """A level's tiles row by row; edge tiles are padded with black (readers must clip them)."""
    h, w = level.shape[:2]
    out = []
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            block = np.zeros((tile, tile, 3), np.uint8)
            part = level[ty : ty + tile, tx : tx + tile]
            block[: part.shape[0], : part.shape[1]] = part
            out.append(b"" if len(out) in missing else _encode_tile(block, photometric, quality))
    return out


def write_jpeg_pyramid(
    path: str | Path,
    image: np.ndarray,
    photometric: str = "rgb",
    downsamples: Sequence[int] = (1, 2, 4),
    tables: bool = True,
    mpp: float = 0.25,
    app_mag: float = 40,
    tile: int = 256,
    quality: int = 90,
    missing: Sequence[int] = (),
    aperio: bool = True,
) -> Path:
    """An Aperio SVS whose JPEG tiles are encoded here: ``photometric`` ``rgb`` or ``ycbcr``,
    levels at ``downsamples``, the quantisation/Huffman tables in JPEGTables when ``tables``
    (else in each tile), level-0 tiles numbered in ``missing`` stored empty (0 bytes).
    ``aperio=False``: a generic tiled TIFF instead (pixel size in the resolution tags, no thumbnail)."""
    path = Path(path)
    h, w = image.shape[:2]
    desc = (f"Aperio Image Library v12.0.15 \n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
            f"|AppMag = {app_mag:g}|MPP = {mpp:g}")
    with _jpeg_encoder(), tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate(downsamples):
            level = _downsampled(image, ds)
            data = _level_tiles(level, tile, photometric, quality, missing if ds == 1 else ())
            jpegtables = None
            if tables:
                split = [split_jpeg_tables(t) if t else (None, b"") for t in data]
                jpegtables = next(t for t, _ in split if t)
                if any(t not in (None, jpegtables) for t, _ in split):
                    raise ValueError("tiles of one level must share their tables")
                data = [d for _, d in split]
            if aperio:
                page = {"description": desc if i == 0 else f"Aperio Image Library v12.0.15 \n{w}x{h} -> "
                                                              f"{level.shape[1]}x{level.shape[0]}"}
            else:
                px_per_cm = 1e4 / (mpp * ds)
                page = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER",
                        "subfiletype": 0 if i == 0 else 1}
            tw.write(
                iter(data), shape=level.shape, dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                photometric="rgb", compressionargs={"outcolorspace": "RGB" if photometric == "rgb" else "YCBCR"},
                subsampling=(1, 1) if photometric == "rgb" else (2, 2), jpegtables=jpegtables, metadata=None, **page,
            )
            if i == 0 and aperio:  # Aperio's second page: a stripped thumbnail (not a pyramid level)
                thumb = _downsampled(image, max(1, max(h, w) // 256))
                tw.write(thumb, photometric="rgb", description="Aperio Image Library v12.0.15 \nthumbnail", metadata=None)
    return path


def corrupt_tile(path: str | Path, x: int, y: int, page: int = 0) -> None:
    """Overwrite the tile holding pixel (x, y) of TIFF page ``page`` (0 = level 0) with garbage."""
    path = Path(path)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[page]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * tiles_across + (x // page.tilewidth)
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    garbage = np.random.default_rng(1).integers(0, 256, size=count, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.seek(offset)
        # keep a JPEG start marker so the decoder starts and then fails mid-stream
        f.write(b"\xff\xd8" + garbage[2:])


class NetworkAccessError(RuntimeError):
    """Raised by the patched socket functions of :func:`disable_network`."""


def disable_network(monkeypatch) -> None:  # noqa: ANN001 - a pytest MonkeyPatch
    """Make every internet socket and name lookup in this process (and its forked workers) fail.

    Local (AF_UNIX) sockets stay allowed: multiprocessing uses them to pass tensors between
    DataLoader workers and the main process.
    """
    import socket

    real_socket = socket.socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkAccessError("network access attempted during an offline test")

    class NoInternetSocket(real_socket):
        def __init__(self, family: int = -1, *args: object, **kwargs: object) -> None:
            if family in (-1, socket.AF_INET, socket.AF_INET6):
                refuse()
            super().__init__(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", NoInternetSocket)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _svs_level_args(tile: int, photometric: str, quality: int, tables_from: np.ndarray | None) -> dict:
    """tifffile's arguments for every pyramid level of :func:`write_large_svs`; with
    ``tables_from`` the JPEG tables (taken from encoding that tile) go into the page's JPEGTables."""
    return {"dtype": np.uint8, "tile": (tile, tile), "compression": "jpeg", "photometric": "rgb", "metadata": None,
            "compressionargs": {"outcolorspace": "RGB" if photometric == "rgb" else "YCBCR"},
            "subsampling": (1, 1) if photometric == "rgb" else (2, 2),
            "jpegtables": (split_jpeg_tables(_encode_tile(tables_from, photometric, quality))[0]
                           if tables_from is not None else None)}


def write_large_svs(path: str | Path, width: int, height: int, margin: int = 512, mpp: float = 0.25,
                    app_mag: float = 40, downsamples: Sequence[int] = (1, 4, 16), tile: int = 256, pool: int = 16,
                    quality: int = 90, seed: int = 0, photometric: str = "ycbcr", tables: bool = False) -> Path:
    """A large Aperio-style SVS made fast from a pool of pre-encoded JPEG tiles.

    Tissue covers everything but a ``margin`` of glass on each side (``width``, ``height`` and
    ``margin`` multiples of ``tile``), like a 40x TCGA scan with levels 1, 4 and 16 by default.
    Level-0 tiles are copied from the pool, so writing a gigapixel slide takes seconds. Tiles are
    coded as ``photometric`` says (see :func:`write_jpeg_pyramid`), with their tables in the
    page's JPEGTables when ``tables``.
    """
    path = Path(path)
    if width % tile or height % tile or margin % tile:
        raise ValueError("width, height and margin must be multiples of the tile size")
    tissue_tiles = [make_slide_image(tile, tile, [(0, 0, tile, tile)], seed=seed + i) for i in range(pool)]
    glass_tile = make_slide_image(tile, tile, [], seed=seed)

    def encode(arr: np.ndarray) -> bytes:
        data = _encode_tile(arr, photometric, quality)
        return split_jpeg_tables(data)[1] if tables else data

    tissue_bytes, glass_bytes = [encode(t) for t in tissue_tiles], encode(glass_tile)

    def level_tiles(ds: int) -> Iterator[bytes]:
        lw, lh = width // ds, height // ds
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                k = (tx // tile * 7 + ty // tile * 13) % pool
                if ds == 1:
                    x0, y0 = tx, ty
                    inside = margin <= x0 < width - margin and margin <= y0 < height - margin
                    yield tissue_bytes[k] if inside else glass_bytes
                    continue
                # reduced level: tissue where the level-0 position is inside the tissue rectangle
                ys = (ty + np.arange(tile)) * ds
                xs = (tx + np.arange(tile)) * ds
                inside = ((ys >= margin) & (ys < height - margin))[:, None] & ((xs >= margin) & (xs < width - margin))[None, :]
                yield encode(np.where(inside[..., None], tissue_tiles[k], glass_tile))

    desc = (f"Aperio Image Library v12.0.15 \n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
            f"JPEG/RGB Q={quality}|AppMag = {app_mag:g}|MPP = {mpp:g}")
    common = _svs_level_args(tile, photometric, quality, glass_tile if tables else None)
    with _jpeg_encoder(), tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(level_tiles(1), shape=(height, width, 3), description=desc, **common)
        tw.write(glass_tile[:64, :64], photometric="rgb", description="Aperio thumbnail", metadata=None)
        for ds in downsamples[1:]:
            tw.write(level_tiles(ds), shape=(height // ds, width // ds, 3), **common,
                     description=f"Aperio \n{width}x{height} -> {width // ds}x{height // ds}")
    return path

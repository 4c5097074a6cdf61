"""Raw JPEG tiles decoded on the device: batched decode, patch assembly and resize as tensors.

With the raw-tile reader and a CUDA device, the reader processes only read the compressed tiles
of each chunk (:class:`~.rawtiles.TileChunk`); the main process decodes all tiles of a batch in
one ``torchvision.io.decode_jpeg(..., device="cuda")`` call (nvJPEG, shipped in the torchvision
wheel), assembles each patch from its tiles by indexing, paints what lies outside the level image
with the slide's background, and resizes on the device the way :func:`.grid.resize_patch` does
(box filter for an integer factor, else antialiased bilinear). Normalisation follows in the
encoder wrapper, on the same device. On a CPU device the same code runs with libjpeg-turbo
(that is how it is tested without a GPU).

nvJPEG decodes at full resolution (no scaled DCT), which costs the GPU little. Whether it
honours the colour marker of RGB-coded tiles is checked once per kind of level
(:meth:`DeviceTileDecoder.check`) against Pillow's decode on the CPU; a level that disagrees is
decoded in the reader processes instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .rawtiles import RawTileReader, TileChunk, decode_tile
from .slides import SlideError

__all__ = ["CHECK_PSNR_DB", "DeviceTileDecoder", "assemble_patches", "psnr", "resize_batch"]

CHECK_PSNR_DB = 40.0  # the device decode of sample tiles must match Pillow's at least this well


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when equal)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def resize_batch(x: torch.Tensor, out: int) -> torch.Tensor:
    """Float N x 3 x R x R patches resized to ``out``: mean over k x k blocks for an integer
    factor k (Pillow's ``reduce``), else antialiased bilinear (Pillow's ``BILINEAR``)."""
    size = x.shape[-1]
    if size == out:
        return x
    if size % out == 0:
        return F.avg_pool2d(x, size // out)
    return F.interpolate(x, size=(out, out), mode="bilinear", antialias=True, align_corners=False)


def assemble_patches(tiles: torch.Tensor, chunk: TileChunk) -> torch.Tensor:
    """The chunk's patches (N x S x S x 3 uint8) from its decoded tiles (T x 3 x th x tw)."""
    n, gy, gx = chunk.grid.shape
    dev = tiles.device
    th, tw, size = chunk.tile_height, chunk.tile_width, chunk.read_size
    background = torch.tensor(chunk.background, dtype=torch.uint8, device=dev)
    blank = background.view(1, 3, 1, 1).expand(1, 3, th, tw)
    pool = torch.cat([tiles, blank]) if tiles.numel() else blank  # index T = the background tile
    grid = chunk.grid.to(dev)
    grid = torch.where(grid < 0, torch.full_like(grid, pool.shape[0] - 1), grid)
    canvas = pool[grid]  # N x gy x gx x 3 x th x tw
    canvas = canvas.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, gy * th, gx * tw)
    steps = torch.arange(size + 1, device=dev)  # one more pixel, for a fractional corner
    origin, valid = chunk.origin.to(dev), chunk.valid.to(dev)
    rows, cols = origin[:, 1:2] + steps, origin[:, 0:1] + steps  # N x (R + 1)
    patches = canvas[torch.arange(n, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    inside = (steps[None, :] < valid[:, 1:2])[:, :, None] & (steps[None, :] < valid[:, 0:1])[:, None, :]
    patches = torch.where(inside[..., None], patches, background)  # N x (R + 1) x (R + 1) x 3
    if not bool(chunk.frac.any()):
        patches = patches[:, :size, :size]
        if size == chunk.out_size:
            return patches
        x = patches.permute(0, 3, 1, 2).float()
    else:
        x = _shift(patches.permute(0, 3, 1, 2).float(), chunk.frac.to(dev))
    x = resize_batch(x, chunk.out_size)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _shift(x: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """N x 3 x (R + 1) x (R + 1) -> N x 3 x R x R sampled ``frac`` (x, y) of a pixel in (bilinear;
    a zero fraction gives the pixels unchanged). Rounded to integers as the CPU reader does."""
    fx, fy = frac[:, 0].view(-1, 1, 1, 1), frac[:, 1].view(-1, 1, 1, 1)
    top = x[..., :-1, :-1] * (1 - fx) + x[..., :-1, 1:] * fx
    bottom = x[..., 1:, :-1] * (1 - fx) + x[..., 1:, 1:] * fx
    return (top * (1 - fy) + bottom * fy).round_()


class DeviceTileDecoder:
    """Decodes :class:`TileChunk` lists into patches on ``device`` (see the module doc)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._checked: dict[tuple[str, bytes], str | None] = {}

    @property
    def name(self) -> str:
        """The decoder's name for the provenance attributes."""
        return f"torchvision-{self.device.type}"

    def _decode_streams(self, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not streams:
            return []
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs for TorchCodec (warning on every call);
            # decode_jpeg, nvJPEG on CUDA, is what the installed wheel ships, so it is used until then
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            return decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device)

    def decode(self, chunks: Sequence[TileChunk]) -> list[torch.Tensor]:
        """Each chunk's patches (N x S x S x 3 uint8 on the device); all tiles in one decode call."""
        streams: list[torch.Tensor] = []
        spans = []
        for chunk in chunks:
            ends = torch.cumsum(chunk.lengths, 0).tolist()
            starts = [0, *ends[:-1]]
            spans.append((len(streams), len(ends)))
            streams.extend(chunk.data[a:b] for a, b in zip(starts, ends))
        decoded = self._decode_streams(streams)
        out = []
        for chunk, (first, count) in zip(chunks, spans):
            part = decoded[first : first + count]
            shape = (chunk.tile_height, chunk.tile_width)
            if any(tuple(t.shape[1:]) != shape for t in part):
                raise ValueError(f"a JPEG tile does not have the TIFF tile size {shape[1]}x{shape[0]}")
            tiles = torch.stack(part) if part else torch.zeros((0, 3, *shape), dtype=torch.uint8, device=self.device)
            out.append(assemble_patches(tiles, chunk))
        return out

    def check(self, reader: RawTileReader, samples: int = 2) -> str | None:
        """None when this device decodes ``reader``'s level like Pillow does (PSNR >= CHECK_PSNR_DB
        on its first stored tiles), else why not; the answer is kept per kind of level."""
        key = (reader.raw.photometric, reader.raw.header)
        if key in self._checked:
            return self._checked[key]
        raw = reader.raw
        stored = np.flatnonzero(raw.counts)[:samples]
        reason = None
        try:
            for i in stored:
                col, row = int(i) % raw.tiles_across, int(i) // raw.tiles_across
                stream = reader.tile_stream(col, row)
                want = decode_tile(stream, raw.tile_width, raw.tile_height, raw.photometric)
                got = self._decode_streams([torch.frombuffer(bytearray(stream), dtype=torch.uint8)])[0]
                score = psnr(got.permute(1, 2, 0).cpu().numpy(), want)
                if score < CHECK_PSNR_DB:
                    reason = (f"{self.name} decodes {raw.photometric} JPEG tiles unlike libjpeg "
                              f"(PSNR {score:.1f} dB < {CHECK_PSNR_DB:g})")
                    break
        except (RuntimeError, ValueError, OSError, SlideError) as err:  # then: decode in the reader processes
            reason = f"{self.name} cannot decode the tiles ({type(err).__name__}: {err})"
        finally:
            reader.close()  # the reader processes open their own file; none stays open here
        self._checked[key] = reason
        return reason

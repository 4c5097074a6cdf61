"""Streaming the patches of one or more slides through the encoder into their bags.

A *group* is one slide, or several consecutive slides that each have fewer patches than the
pipeline needs to keep its readers and batches full (see :func:`group_target`). One DataLoader
reads the chunks of all the group's slides in order, a whole chunk per work item; batches are
assembled across slide boundaries, and each batch's features are split back to the slides they
belong to. Each slide has its own temporary bag, renamed when its last patch is written, and its
own fate: a chunk that cannot be read or decoded, or features that are not finite, fail that
slide only (recorded with the stage and reason) while the group goes on.

Chunks cross from the reader processes to the main process as :class:`Chunk`: decoded pixels, or
compressed tiles (:class:`~.rawtiles.TileChunk`) when the device decodes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from umeml.data.bags import BagWriter
from umeml.errors import UmemlError

from .devicedecode import DeviceTileDecoder
from .qc import write_qc_png
from .rawtiles import TileChunk
from .readers import PatchChunks
from .slides import SlideError

__all__ = ["Chunk", "ChunkStream", "SlideFailure", "SlideJob", "failure_reason", "group_target", "run_group", "stage"]

log = logging.getLogger("umeml.client.extract")


class SlideFailure(UmemlError):
    """One slide failed at ``stage`` (open, resolution, tissue, reader, qc, resume, features, write)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage, self.reason = stage, reason


def failure_reason(err: BaseException) -> str:
    """``Type: last line of the message`` (a DataLoader re-raise carries a whole traceback)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


@contextlib.contextmanager
def stage(name: str, last_line: bool = False) -> Iterator[None]:
    """Turn any exception in the block into a :class:`SlideFailure` at stage ``name``.

    A :class:`SlideError` keeps its own message (it names the slide) unless ``last_line``, in
    which case every error is written as :func:`failure_reason` (the streaming stages).
    """
    try:
        yield
    except SlideFailure:
        raise
    except SlideError as err:
        raise SlideFailure(name, failure_reason(err) if last_line else str(err)) from err
    except Exception as err:  # any failure of one slide is recorded, the batch goes on
        raise SlideFailure(name, failure_reason(err) if last_line else f"{type(err).__name__}: {err}") from err


def group_target(batch_size: int, workers: int, chunk_size: int, prefetch: int) -> int:
    """Patches a group should hold: two batches, and enough chunks for every reader's prefetch.
    A slide with fewer patches is read together with the slides after it."""
    return max(2 * batch_size, max(1, workers) * chunk_size * prefetch)


@dataclass
class SlideJob:
    """A slide ready to stream: its patches, its bag and attributes, how it is decoded."""

    slide_id: str
    path: Path
    bag: Path
    chunks: PatchChunks
    attrs: dict[str, object]
    on_device: bool = False  # True: the readers send compressed tiles and the device decodes them
    qc: tuple | None = None  # write_qc_png's (path, tissue, coords, patch_size_level0, title)

    @property
    def coords(self) -> np.ndarray:
        return self.chunks.coords


@dataclass
class Chunk:
    """One work item's result: chunk ``index`` of the group's slide ``slide``, as decoded
    ``pixels`` (n x S x S x 3 uint8) or compressed ``tiles``, or the ``error`` that stopped it."""

    slide: int
    index: int
    n: int
    pixels: torch.Tensor | None = None
    tiles: TileChunk | None = None
    error: str | None = None

    def pin_memory(self) -> Chunk:
        """Pinned copies of the tensors (the DataLoader calls this when it pins memory)."""
        pixels = self.pixels.pin_memory() if self.pixels is not None else None
        tiles = self.tiles.pin_memory() if self.tiles is not None else None
        return replace(self, pixels=pixels, tiles=tiles)


class ChunkStream(Dataset):
    """All chunks of a group's slides in order, as :class:`Chunk` items. A read error becomes the
    chunk's ``error`` (the slide fails, the stream goes on). Each process keeps one slide open."""

    def __init__(self, jobs: Sequence[SlideJob]):
        self.sources = [(job.chunks, job.on_device) for job in jobs]
        self.items = [(k, j) for k, (chunks, _) in enumerate(self.sources) for j in range(len(chunks))]
        self._open: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Chunk:
        k, j = self.items[i]
        if self._open is not None and self._open != k:
            self.sources[self._open][0].close()  # chunks come in slide order: that slide is done here
        self._open = k
        chunks, on_device = self.sources[k]
        n = len(chunks.chunk_coords(j))
        try:
            if on_device:
                return Chunk(k, j, n, tiles=chunks.tile_chunk(j))
            return Chunk(k, j, n, pixels=chunks[j][0])
        except Exception as err:  # noqa: BLE001 - recorded as the slide's failure by the main process
            return Chunk(k, j, n, error=failure_reason(err))

    def close(self) -> None:
        """Release every slide's reader in this process."""
        for chunks, _ in self.sources:
            chunks.close()
        self._open = None


def iter_chunks(stream: ChunkStream, workers: int, pin: bool, prefetch: int) -> Iterator[Chunk]:
    """The stream's chunks in order; with ``workers`` > 0 the reader processes are started
    (forked) before this returns."""
    if workers == 0:
        def read_here() -> Iterator[Chunk]:
            try:
                for i in range(len(stream)):
                    yield stream[i]
            finally:
                stream.close()

        return read_here()
    loader = DataLoader(stream, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                        prefetch_factor=prefetch, persistent_workers=False)
    return iter(loader)


class _Sink:
    """One slide's bag being written: its temporary file, rows written so far, and its fate."""

    def __init__(self, job: SlideJob, feature_dim: int, dtype: str):
        self.job = job
        self.tmp = job.bag.with_name(f".{job.bag.name}.tmp-{os.getpid()}")
        self.done = 0  # rows written; chunks arrive in order
        self.next_chunk = 0
        self.failure: SlideFailure | None = None
        self.finished = False
        with stage("features", last_line=True):
            self.writer: BagWriter | None = BagWriter(self.tmp, feature_dim=feature_dim, attrs=job.attrs, dtype=dtype)

    @property
    def open(self) -> bool:
        return not self.finished and self.failure is None

    def append(self, feats: np.ndarray) -> None:
        """Write the slide's next rows; the bag is renamed into place after the last one."""
        if not np.isfinite(feats).all():
            raise SlideFailure("features", f"non-finite features for patches {self.done}..{self.done + len(feats) - 1} "
                                           "(try --precision fp32 or --dtype float32)")
        with stage("features", last_line=True):
            self.writer.append(feats, self.job.coords[self.done : self.done + len(feats)])
        self.done += len(feats)
        if self.done == len(self.job.coords):
            with stage("features", last_line=True):
                self._close()
            with stage("write", last_line=True):
                os.replace(self.tmp, self.job.bag)
            self.finished = True

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def fail(self, failure: SlideFailure) -> None:
        """Record the slide's failure and remove its temporary bag."""
        if self.failure is None:
            self.failure = failure
        try:
            self._close()
        except Exception as err:  # noqa: BLE001 - the slide has failed already; its file goes anyway
            log.warning("%s: could not close the temporary bag %s (%s)", self.job.slide_id, self.tmp, err)
        self.tmp.unlink(missing_ok=True)


class _Batches:
    """Chunks gathered into inference batches across slides; features are split back per slide."""

    def __init__(self, runner, decoder: DeviceTileDecoder, batch_size: int, dtype: str, bar: tqdm):
        self.runner, self.decoder = runner, decoder
        self.batch_size, self.dtype, self.bar = batch_size, dtype, bar
        self.pending: list[tuple[_Sink, torch.Tensor | TileChunk]] = []
        self.n = 0

    def add(self, sink: _Sink, chunk: Chunk) -> None:
        """Queue a chunk (pixels go to the device now); run a batch once enough are queued."""
        payload = chunk.tiles if chunk.tiles is not None else self.runner.to_device(chunk.pixels)
        self.pending.append((sink, payload))
        self.n += chunk.n
        if self.n >= self.batch_size:
            self.flush()

    def _decoded(self, entries: list[tuple[_Sink, torch.Tensor | TileChunk]]) -> list[tuple[_Sink, torch.Tensor]]:
        """Entries with their tiles decoded on the device; a chunk that does not decode fails its slide."""
        tiles = [i for i, (_, p) in enumerate(entries) if isinstance(p, TileChunk)]
        decoded: dict[int, torch.Tensor] = {}
        if tiles:
            try:
                decoded = dict(zip(tiles, self.decoder.decode([entries[i][1] for i in tiles])))
            except (RuntimeError, ValueError):  # find the chunk(s) at fault, one by one
                for i in tiles:
                    try:
                        decoded[i] = self.decoder.decode([entries[i][1]])[0]
                    except (RuntimeError, ValueError) as err:
                        entries[i][0].fail(SlideFailure("features", failure_reason(err)))
        out = []
        for i, (sink, payload) in enumerate(entries):
            payload = decoded.get(i, payload)
            if sink.open and not isinstance(payload, TileChunk):
                out.append((sink, payload))
        return out

    def flush(self, final: bool = False) -> None:
        """Run full batches of the queued chunks through the encoder and write each slide's rows;
        ``final``: the rest too. Batches hold exactly ``batch_size`` patches (a chunk is split
        across two batches where it must), so the encoder always sees the same shape."""
        entries = [(s, p) for s, p in self.pending if s.open]
        parts = self._decoded(entries)
        while parts:
            n = sum(len(t) for _, t in parts)
            if n < self.batch_size and not final:
                break
            head, parts = _split(parts, self.batch_size)
            self._run(head)
        self.pending = [(s, t) for s, t in parts if s.open]
        self.n = sum(len(t) for _, t in self.pending)

    def _run(self, parts: list[tuple[_Sink, torch.Tensor]]) -> None:
        parts = [(s, t) for s, t in parts if s.open]
        if not parts:
            return
        batch = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts])
        feats = self.runner(batch).astype(self.dtype, copy=False)
        pos = 0
        while parts:
            sink, n = parts[0][0], 0
            while parts and parts[0][0] is sink:  # a slide's consecutive chunks: one write
                n += len(parts.pop(0)[1])
            if sink.open:
                try:
                    sink.append(feats[pos : pos + n])
                except SlideFailure as failure:
                    sink.fail(failure)
            pos += n
        self.bar.update(len(feats))


def _split(parts: list[tuple[_Sink, torch.Tensor]], size: int) -> tuple[list, list]:
    """The first ``size`` rows of ``parts`` and the rest (a part is cut where the border falls)."""
    head, tail, n = [], [], 0
    for sink, t in parts:
        if n >= size:
            tail.append((sink, t))
        elif n + len(t) <= size:
            head.append((sink, t))
        else:
            head.append((sink, t[: size - n]))
            tail.append((sink, t[size - n :]))
        n += len(t)
    return head, tail


def _start_qc(jobs: Sequence[SlideJob]) -> list[tuple[SlideJob, Future]]:
    """Draw the QC pictures in a background thread (started after the readers fork)."""
    wanted = [job for job in jobs if job.qc is not None]
    if not wanted:
        return []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umeml-qc")
    futures = [(job, pool.submit(write_qc_png, *job.qc[:4], title=job.qc[4])) for job in wanted]
    pool.shutdown(wait=False)  # the thread ends when the pictures are drawn
    return futures


def _wait_qc(futures: list[tuple[SlideJob, Future]]) -> None:
    for job, future in futures:
        try:
            future.result()
        except Exception as err:  # noqa: BLE001 - the bag is fine; the picture is an aid
            log.warning("%s: could not write the QC image (%s)", job.slide_id, err)


def _stream(sinks: list[_Sink], chunks: Iterator[Chunk], batches: _Batches) -> None:
    for chunk in chunks:
        sink = sinks[chunk.slide]
        if chunk.index != sink.next_chunk:
            raise RuntimeError(f"patch chunks out of order (chunk {chunk.index} of {sink.job.slide_id})")
        sink.next_chunk += 1
        if not sink.open:
            continue
        if chunk.error is not None:
            sink.fail(SlideFailure("features", chunk.error))
            continue
        batches.add(sink, chunk)
    batches.flush(final=True)
    for sink in sinks:
        if sink.open:
            sink.fail(SlideFailure("features", f"RuntimeError: wrote {sink.done} of {len(sink.job.coords)} patches"))


def _open_sinks(jobs: Sequence[SlideJob], feature_dim: int, dtype: str) -> tuple[list[_Sink], dict[int, SlideFailure]]:
    sinks, failures = [], {}
    for k, job in enumerate(jobs):
        try:
            sinks.append(_Sink(job, feature_dim, dtype))
        except SlideFailure as failure:
            failures[k] = failure
    return sinks, failures


def run_group(jobs: Sequence[SlideJob], runner, decoder: DeviceTileDecoder, batch_size: int, dtype: str,
              workers: int, prefetch: int, progress: bool) -> list[SlideFailure | None]:
    """Stream a group's slides into their bags; each slide's failure (or None when its bag is written).

    ``runner`` moves chunks to the device (``to_device``, ``pin``) and turns a uint8 batch into
    float32 features (``__call__``). A failure that belongs to no one slide (the encoder, the
    loader) fails every slide of the group still being written.
    """
    sinks, failures = _open_sinks(jobs, runner.encoder.feature_dim, dtype)
    total = sum(len(s.job.coords) for s in sinks)
    desc = jobs[0].slide_id[:40] if len(jobs) == 1 else f"{len(jobs)} slides"
    bar = tqdm(total=total, desc=desc, unit="patch", position=1, leave=False, disable=not progress)
    qc: list[tuple[SlideJob, Future]] = []
    try:
        if sinks:
            stream = ChunkStream([s.job for s in sinks])
            chunks = iter_chunks(stream, min(workers, len(stream)), runner.pin, prefetch)  # readers start now
            qc = _start_qc([s.job for s in sinks])
            _stream(sinks, chunks, _Batches(runner, decoder, batch_size, dtype, bar))
    except Exception as err:  # noqa: BLE001 - recorded as the failure of every slide still open
        failure = err if isinstance(err, SlideFailure) else SlideFailure("features", failure_reason(err))
        for sink in sinks:
            if sink.open:
                sink.fail(failure)
    finally:
        bar.close()
        _wait_qc(qc)
    by_job = {id(s.job): s.failure for s in sinks}
    return [failures.get(k, by_job.get(id(job))) for k, job in enumerate(jobs)]

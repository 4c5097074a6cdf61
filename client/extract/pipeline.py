"""Slides -> feature bags: tissue grid, parallel patch reading overlapped with batched inference.

For each slide: open it, resolve the target resolution, segment tissue on a thumbnail, lay the
patch grid, write a QC PNG, then stream features into ``<out>/<slide_id>.h5``. Patches are read
by DataLoader worker processes (each with its own openslide handle), a whole batch per work item
so the main process only moves finished uint8 batches to the device (pinned memory and
non-blocking copies on CUDA) while the workers read the next ones. Normalisation runs on the
device; inference under AMP on CUDA.

Robust and resumable: a bag is written to a temporary file and renamed when complete, so a
finished bag is never half written; finished slides are skipped on the next run (after checking
they were made with the same settings); a slide that fails is recorded in ``failures.csv`` with
the stage and reason, and the batch goes on.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from umeml.data.bags import BagError, BagWriter, bag_path, inspect_bag

from .encoders import Encoder, NormalizedEncoder
from .grid import ReadPlan, plan_read, tissue_grid
from .qc import write_qc_png
from .slides import SlideError, open_slide, resolve_target, slide_id_of
from .tissue import TissueParams, read_thumbnail, segment_tissue

__all__ = [
    "FAILURES_FILE",
    "ExtractOptions",
    "ExtractSummary",
    "PatchChunks",
    "SlideResult",
    "autocast_context",
    "default_workers",
    "extract_slides",
    "resolve_device",
]

log = logging.getLogger("umeml.client.extract")

FAILURES_FILE = "failures.csv"
QC_DIR = "qc"
THUMB_MAX_SIDE = 2048
THUMB_MIN_PATCH_PX = 8  # a patch spans at least this many thumbnail pixels
THUMB_HARD_MAX_SIDE = 8192


def default_workers() -> int:
    """Reader processes by default: all cores but one for the main process (1 to 16)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 2
    return max(1, min(16, cores - 1))


@dataclass(frozen=True)
class ExtractOptions:
    """Settings of one extraction run (see ``umeml-client extract --help``)."""

    mpp: float | None = 0.5
    magnification: float | None = None
    patch_size: int = 256
    batch_size: int = 64
    num_workers: int | None = None  # None: default_workers()
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    dtype: str = "float16"  # stored feature dtype
    assume_mpp: float | None = None
    min_tissue_fraction: float = 0.5
    tissue: TissueParams = field(default_factory=TissueParams)
    overwrite: bool = False
    qc: bool = True
    progress: bool = True
    prefetch_factor: int = 4

    def __post_init__(self) -> None:
        if (self.mpp is None) == (self.magnification is None):
            raise ValueError("give exactly one of mpp and magnification")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if self.magnification is not None and not self.magnification > 0:
            raise ValueError(f"magnification must be positive, got {self.magnification}")
        if self.patch_size < 8:
            raise ValueError(f"patch size must be at least 8, got {self.patch_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.num_workers}")
        if self.precision not in {"auto", "fp32", "bf16", "fp16"}:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision}")
        if self.dtype not in {"float16", "float32"}:
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype}")


@dataclass
class SlideResult:
    """What happened to one slide: status ``done``, ``skipped`` or ``failed``."""

    slide_id: str
    path: Path
    status: str
    n_patches: int = 0
    seconds: float = 0.0
    stage: str = ""
    reason: str = ""
    bag: Path | None = None


@dataclass
class ExtractSummary:
    """All slides' results of one run and where failures were written."""

    results: list[SlideResult]
    failures_path: Path | None

    def _count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def done(self) -> int:
        return self._count("done")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.results if r.status == "done")


# -- reading patches in workers -----------------------------------------------------------------
class PatchChunks(Dataset):
    """Item ``i`` = the ``i``-th chunk of ``chunk_size`` patches as a uint8 tensor (n x S x S x 3), and ``i``.

    Chunks are smaller than inference batches, so every reader process has work even on a
    slide of a few batches, and the main process assembles batches from them. Each process
    opens its own openslide handle on first use (handles are never shared across processes),
    reads every patch at the planned level and resizes it to ``out_size``.
    """

    def __init__(self, path: str | Path, coords: np.ndarray, plan: ReadPlan, out_size: int, chunk_size: int,
                 assume_mpp: float | None = None):
        self.path = Path(path)
        self.coords = np.asarray(coords, np.int64)
        self.plan = plan
        self.out_size = int(out_size)
        self.chunk_size = int(chunk_size)
        self.assume_mpp = assume_mpp
        self._slide = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.coords) / self.chunk_size)

    def _handle(self):  # noqa: ANN202 - a Slide
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.path, assume_mpp=self.assume_mpp)
            self._pid = os.getpid()
        return self._slide

    def read_patch(self, x: int, y: int) -> np.ndarray:
        """One patch as an out_size x out_size x 3 uint8 array."""
        slide = self._handle()
        size, out = self.plan.read_size, self.out_size
        img = slide.read_image((x, y), self.plan.level, (size, size))
        if size != out:
            if size % out == 0:
                img = img.reduce(size // out)  # exact integer factor: box filter, fast
            else:
                img = img.resize((out, out), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(img)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = self.coords[index * self.chunk_size : (index + 1) * self.chunk_size]
        out = np.empty((len(chunk), self.out_size, self.out_size, 3), np.uint8)
        for k, (x, y) in enumerate(chunk):
            out[k] = self.read_patch(int(x), int(y))
        return torch.from_numpy(out), index

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None  # never ship an open handle to a worker
        return state


# -- device and precision -----------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` = the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available")
    return dev


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (``auto``: bf16, or fp16 without bf16, on CUDA; fp32 on CPU)."""
    if precision == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Runner:
    """The encoder placed on its device, with normalisation, channels-last and AMP as fit."""

    def __init__(self, encoder: Encoder, options: ExtractOptions):
        self.encoder = encoder
        self.device = resolve_device(options.device)
        self.options = options
        model = NormalizedEncoder(encoder).to(self.device).eval()
        if encoder.spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.pin = self.device.type == "cuda"
        if self.pin:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.options.precision)

    def to_device(self, chunk: torch.Tensor) -> torch.Tensor:
        return chunk.to(self.device, non_blocking=self.pin)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """Features (float32, on the CPU) of a uint8 N x S x S x 3 batch already on the device."""
        with self.autocast():
            feats = self.model(batch)
        return feats.float().cpu().numpy()


def chunk_size_for(batch_size: int, largest: int = 16) -> int:
    """Patches per reading work item: the largest divisor of ``batch_size`` up to ``largest``."""
    return max(d for d in range(1, min(largest, batch_size) + 1) if batch_size % d == 0)


# -- resume / failures --------------------------------------------------------------------------
def _expected_attrs(encoder: Encoder, options: ExtractOptions) -> dict[str, object]:
    return {
        "encoder": encoder.name,
        "weights_sha256": encoder.weights_sha256,
        "feature_dim": encoder.feature_dim,
        "patch_size": options.patch_size,
        "target_mpp": options.mpp,
        "target_magnification": options.magnification,
        "encoder_input_size": encoder.input_size or options.patch_size,
    }


def _check_existing(path: Path, expected: dict[str, object]) -> str | None:
    """None when the bag at ``path`` is complete and made with the same settings, else why not.

    Raises :class:`BagError` when the file is unreadable (then it is extracted again).
    """
    info = inspect_bag(path)
    if "encoder" not in info.attrs:
        return f"{path.name} exists but was not written by umeml-client extract (no 'encoder' attribute)"
    diffs = []
    for key, want in expected.items():
        have = info.attrs.get(key)
        if want is None and have is None:
            continue
        if isinstance(want, float) and isinstance(have, (int, float)) and math.isclose(want, have, rel_tol=1e-6):
            continue
        if have != want:
            diffs.append(f"{key}: bag has {have!r}, this run {want!r}")
    if diffs:
        return f"{path.name} exists with other settings ({'; '.join(diffs)})"
    return None


def _write_failures(path: Path, failures: Sequence[SlideResult]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "path", "stage", "reason", "time_utc"])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for r in failures:
            writer.writerow([r.slide_id, str(r.path), r.stage, r.reason, stamp])
    tmp.replace(path)


def _remove_stale_temps(out_dir: Path, slide_id: str) -> None:
    for tmp in out_dir.glob(f".{slide_id}.h5.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # a live process (another extraction) is writing it
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass


def _thumbnail_downsample(slide, patch_size_level0: int) -> float:  # noqa: ANN001 - a Slide
    """Thumbnail downsample: about THUMB_MAX_SIDE pixels a side, a patch at least
    THUMB_MIN_PATCH_PX thumbnail pixels wide, and read from the coarsest pyramid level that allows
    (reading a big level 0 for a thumbnail of a small slide costs more than segmenting it)."""
    longest = max(slide.dimensions)
    finest_allowed = max(1.0, patch_size_level0 / THUMB_MIN_PATCH_PX)  # coarsest downsample allowed
    ds = min(max(1.0, longest / THUMB_MAX_SIDE), finest_allowed)
    coarse = [lds for lds in slide.level_downsamples if lds <= finest_allowed * (1 + 1e-3)]
    if coarse:
        ds = max(ds, max(coarse))
    return max(ds, longest / THUMB_HARD_MAX_SIDE, 1.0)


# -- one slide ----------------------------------------------------------------------------------
class _SlideFailure(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage, self.reason = stage, reason


def _iter_chunks(dataset: PatchChunks, workers: int, pin: bool, prefetch: int) -> Iterator[tuple[torch.Tensor, int]]:
    """An iterator over the chunks in order; with ``workers`` > 0 the reader processes are
    started (forked) before this returns."""
    if workers == 0:
        def read_here() -> Iterator[tuple[torch.Tensor, int]]:
            try:
                for i in range(len(dataset)):
                    yield dataset[i]
            finally:
                dataset.close()

        return read_here()
    loader = DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
        prefetch_factor=prefetch, persistent_workers=False,
    )
    return iter(loader)


def _extract_one(
    path: Path, out_dir: Path, runner: _Runner, options: ExtractOptions, expected: dict[str, object], progress: bool
) -> SlideResult:
    sid = slide_id_of(path)
    t0 = time.perf_counter()
    bag = bag_path(out_dir, sid)
    if bag.exists() and not options.overwrite:
        try:
            mismatch = _check_existing(bag, expected)
        except BagError as err:
            log.warning("%s: existing bag is unreadable (%s); extracting again", sid, err)
        else:
            if mismatch:
                raise _SlideFailure("resume", mismatch + "; use --overwrite or another --out")
            return SlideResult(sid, path, "skipped", n_patches=inspect_bag(bag).n_patches, bag=bag)
    _remove_stale_temps(out_dir, sid)
    encoder = runner.encoder
    stage = "open"
    try:
        with open_slide(path, assume_mpp=options.assume_mpp) as slide:
            stage = "resolution"
            target = resolve_target(slide.resolution, path, mpp=options.mpp, magnification=options.magnification)
            plan = plan_read(slide, target, options.patch_size)
            if plan.downsample < 0.95:
                log.warning("%s: target resolution is finer than the scan (downsample %.3f); patches are upsampled",
                            sid, plan.downsample)
            stage = "tissue"
            thumb, scale = read_thumbnail(slide, _thumbnail_downsample(slide, plan.patch_size_level0))
            tissue = segment_tissue(thumb, scale, plan.patch_size_level0, options.tissue)
            coords = tissue_grid(tissue, slide.dimensions, plan.patch_size_level0, options.min_tissue_fraction)
            resolution = slide.resolution
            dims = slide.dimensions
        qc_args = (out_dir / QC_DIR / f"{sid}.png", tissue, coords, plan.patch_size_level0)
        qc_title = f"{sid}: {len(coords)} patches"
        if len(coords) == 0:
            if options.qc:
                stage = "qc"
                write_qc_png(*qc_args, title=qc_title)
            raise _SlideFailure(
                "tissue",
                f"no tissue patches found (saturation threshold {tissue.threshold}, tissue share of thumbnail "
                f"{tissue.tissue_fraction:.3f}); check the QC image or lower --min-tissue-fraction/--min-saturation",
            )
    except _SlideFailure:
        raise
    except SlideError as err:
        raise _SlideFailure(stage, str(err)) from err
    except Exception as err:  # noqa: BLE001 - any failure of one slide is recorded, the batch goes on
        raise _SlideFailure(stage, f"{type(err).__name__}: {err}") from err

    out_size = encoder.input_size or options.patch_size
    attrs = {
        "encoder": encoder.name,
        "weights_sha256": encoder.weights_sha256,
        "patch_size": options.patch_size,
        "patch_size_level0": plan.patch_size_level0,
        "level": plan.level,
        "level_downsample": plan.level_downsample,
        "downsample": plan.downsample,
        "mpp": target.mpp,
        "magnification": target.magnification,
        "target_mpp": options.mpp,
        "target_magnification": options.magnification,
        "slide_mpp": resolution.mpp,
        "slide_magnification": resolution.magnification,
        "mpp_source": resolution.mpp_source,
        "encoder_input_size": out_size,
        "slide": path.name,
        "slide_width": dims[0],
        "slide_height": dims[1],
        "coords_level": 0,
        "tissue_threshold": tissue.threshold,
    }
    chunk_size = chunk_size_for(options.batch_size)
    dataset = PatchChunks(path, coords, plan, out_size, chunk_size, assume_mpp=options.assume_mpp)
    workers = default_workers() if options.num_workers is None else options.num_workers
    workers = min(workers, len(dataset))
    tmp = bag.with_name(f".{bag.name}.tmp-{os.getpid()}")
    stage = "features"
    qc_future: Future | None = None
    bar = tqdm(total=len(coords), desc=sid[:40], unit="patch", position=1, leave=False, disable=not progress)
    try:
        with BagWriter(tmp, feature_dim=encoder.feature_dim, attrs=attrs, dtype=options.dtype) as writer:
            pending: list[torch.Tensor] = []
            done = 0  # rows written so far; chunks arrive in order

            def flush() -> None:
                nonlocal done
                batch = pending[0] if len(pending) == 1 else torch.cat(pending)
                pending.clear()
                feats = runner(batch).astype(options.dtype, copy=False)
                if not np.isfinite(feats).all():
                    raise _SlideFailure(
                        "features",
                        f"non-finite features for patches {done}..{done + len(feats) - 1} "
                        "(try --precision fp32 or --dtype float32)",
                    )
                writer.append(feats, coords[done : done + len(feats)])
                done += len(feats)
                bar.update(len(feats))

            n_pending = 0
            chunks = _iter_chunks(dataset, workers, runner.pin, options.prefetch_factor)  # readers start now
            if options.qc:  # drawn while the readers and the encoder work; the thread starts after the fork
                qc_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umeml-qc")
                qc_future = qc_pool.submit(write_qc_png, *qc_args, title=qc_title)
                qc_pool.shutdown(wait=False)  # the thread ends when the picture is written
            for chunk, index in chunks:
                if index * chunk_size != done + n_pending:
                    raise RuntimeError(f"patch chunks out of order (chunk {index})")
                pending.append(runner.to_device(chunk))
                n_pending += len(chunk)
                if n_pending >= options.batch_size:
                    flush()
                    n_pending = 0
            if pending:
                flush()
            if done != len(coords):
                raise RuntimeError(f"wrote {done} of {len(coords)} patches")
        stage = "write"
        os.replace(tmp, bag)
    except _SlideFailure:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as err:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        reason = str(err).strip().splitlines()
        raise _SlideFailure(stage, f"{type(err).__name__}: {reason[-1] if reason else ''}") from err
    finally:
        bar.close()
        if qc_future is not None:
            try:
                qc_future.result()
            except Exception as err:  # noqa: BLE001 - the bag is fine; the picture is an aid
                log.warning("%s: could not write the QC image (%s)", sid, err)
    seconds = time.perf_counter() - t0
    return SlideResult(sid, path, "done", n_patches=len(coords), seconds=seconds, bag=bag)


def extract_slides(
    slides: Sequence[str | Path], out_dir: str | Path, encoder: Encoder, options: ExtractOptions | None = None
) -> ExtractSummary:
    """Extract feature bags for ``slides`` into ``out_dir``; returns every slide's result.

    Slides whose id (file name without extension) is used twice are refused up front with a
    :class:`SlideError`, since their bags would overwrite each other.
    """
    options = options or ExtractOptions()
    out_dir = Path(out_dir)
    paths = [Path(p) for p in slides]
    by_id: dict[str, list[Path]] = {}
    for p in paths:
        by_id.setdefault(slide_id_of(p), []).append(p)
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        lines = "\n".join(f"  - {k}: {', '.join(map(str, v))}" for k, v in sorted(dups.items()))
        raise SlideError(f"slide ids must be unique (a bag is named after its slide id); duplicates:\n{lines}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = _Runner(encoder, options)
    expected = _expected_attrs(encoder, options)
    failures_path = out_dir / FAILURES_FILE
    results: list[SlideResult] = []
    failures: list[SlideResult] = []
    overall = tqdm(total=len(paths), desc="slides", unit="slide", position=0, disable=not options.progress)
    try:
        for path in paths:
            sid = slide_id_of(path)
            t0 = time.perf_counter()
            try:
                result = _extract_one(path, out_dir, runner, options, expected, options.progress)
            except _SlideFailure as err:
                result = SlideResult(sid, path, "failed", seconds=time.perf_counter() - t0, stage=err.stage,
                                     reason=err.reason)
                failures.append(result)
                _write_failures(failures_path, failures)
                log.error("%s: failed at %s: %s", sid, err.stage, err.reason)
            else:
                if result.status == "done":
                    log.info("%s: %d patches in %.1f s (%.1f patches/s)", sid, result.n_patches, result.seconds,
                             result.n_patches / max(result.seconds, 1e-9))
                else:
                    log.info("%s: already extracted, skipped", sid)
            results.append(result)
            overall.update(1)
            overall.set_postfix(done=sum(r.status == "done" for r in results), failed=len(failures))
    finally:
        overall.close()
    if failures:
        _write_failures(failures_path, failures)
    else:
        failures_path.unlink(missing_ok=True)
    return ExtractSummary(results=results, failures_path=failures_path if failures else None)

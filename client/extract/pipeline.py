"""Slides -> feature bags: tissue grid, parallel patch reading overlapped with batched inference.

For each slide: open it, resolve the target resolution, segment tissue on a thumbnail, lay the
patch grid, pick the patch reader (:mod:`.readers`: the raw-tile reader for JPEG-tiled TIFF/SVS
levels, openslide otherwise), then stream features into ``<out>/<slide_id>.h5`` while a QC PNG
is drawn. Patches are read by DataLoader worker processes, a whole chunk per work item, so the
main process only moves finished uint8 chunks to the device (pinned memory and non-blocking
copies on CUDA) while the workers read the next ones; on CUDA the raw reader's workers send the
compressed tiles and the device decodes them (:mod:`.devicedecode`). Slides with fewer patches
than the pipeline needs are read together with the next ones (:mod:`.stream`). Normalisation
runs on the device; inference under AMP on CUDA.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from umeml.data.bags import BagError, bag_path, inspect_bag

from .devicedecode import DeviceTileDecoder
from .encoders import Encoder, NormalizedEncoder
from .grid import ReadPlan, plan_read, tissue_grid
from .qc import write_qc_png
from .rawtiles import RawTileReader
from .readers import READERS, PatchChunks, ReaderChoice, choose_reader
from .slides import (
    Slide,
    SlideError,
    SlideResolution,
    TargetResolution,
    open_slide,
    resolve_target,
    slide_id_of,
)
from .stream import SlideFailure, SlideJob, group_target, run_group, stage
from .tissue import TissueMask, TissueParams, read_thumbnail, segment_tissue

__all__ = [
    "DECODE_MODES",
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
DECODE_MODES = ("auto", "workers", "device")


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
    reader: str = "auto"  # auto | raw | openslide (see readers.choose_reader)
    decode: str = "auto"  # raw JPEG tiles decoded: auto (device on CUDA, else workers) | workers | device

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
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, got {self.reader}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode}")


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


def _thumbnail_downsample(slide: Slide, patch_size_level0: int) -> float:
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




# -- one slide: from its file to a job ------------------------------------------------------------
def _resume(path: Path, bag: Path, options: ExtractOptions, expected: dict[str, object]) -> SlideResult | None:
    """The ``skipped`` result when the slide's bag is complete and made with these settings."""
    if not bag.exists() or options.overwrite:
        return None
    try:
        mismatch = _check_existing(bag, expected)
    except BagError as err:
        log.warning("%s: existing bag is unreadable (%s); extracting again", slide_id_of(path), err)
        return None
    if mismatch:
        raise SlideFailure("resume", mismatch + "; use --overwrite or another --out")
    return SlideResult(slide_id_of(path), path, "skipped", n_patches=inspect_bag(bag).n_patches, bag=bag)


@dataclass(frozen=True)
class _Survey:
    """What a slide's metadata and thumbnail say: resolution, read plan, tissue, patch grid, reader."""

    resolution: SlideResolution
    dims: tuple[int, int]
    target: TargetResolution
    plan: ReadPlan
    tissue: TissueMask
    coords: np.ndarray
    choice: ReaderChoice | None  # None when the slide has no tissue patches


def _plan(slide: Slide, options: ExtractOptions) -> tuple[TargetResolution, ReadPlan]:
    target = resolve_target(slide.resolution, slide.path, mpp=options.mpp, magnification=options.magnification)
    plan = plan_read(slide, target, options.patch_size)
    if plan.downsample < 0.95:
        log.warning("%s: target resolution is finer than the scan (downsample %.3f); patches are upsampled",
                    slide.slide_id, plan.downsample)
    return target, plan


def _survey(path: Path, options: ExtractOptions, out_size: int) -> _Survey:
    with stage("open"):
        slide = open_slide(path, assume_mpp=options.assume_mpp)
    with slide:
        with stage("resolution"):
            target, plan = _plan(slide, options)
        with stage("tissue"):
            thumb, scale = read_thumbnail(slide, _thumbnail_downsample(slide, plan.patch_size_level0))
            tissue = segment_tissue(thumb, scale, plan.patch_size_level0, options.tissue)
            coords = tissue_grid(tissue, slide.dimensions, plan.patch_size_level0, options.min_tissue_fraction)
        choice = None
        if len(coords):
            with stage("reader"):
                choice = choose_reader(slide, plan, out_size, options.reader, assume_mpp=options.assume_mpp)
        return _Survey(slide.resolution, slide.dimensions, target, plan, tissue, coords, choice)


def _bag_attrs(path: Path, encoder: Encoder, options: ExtractOptions, survey: _Survey, out_size: int) -> dict[str, object]:
    plan, target, resolution = survey.plan, survey.target, survey.resolution
    return {
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
        "slide_width": survey.dims[0],
        "slide_height": survey.dims[1],
        "coords_level": 0,
        "tissue_threshold": survey.tissue.threshold,
    }


def _no_tissue(survey: _Survey, qc: tuple, options: ExtractOptions) -> SlideFailure:
    if options.qc:
        with stage("qc"):
            write_qc_png(*qc[:4], title=qc[4])
    tissue = survey.tissue
    return SlideFailure(
        "tissue",
        f"no tissue patches found (saturation threshold {tissue.threshold}, tissue share of thumbnail "
        f"{tissue.tissue_fraction:.3f}); check the QC image or lower --min-tissue-fraction/--min-saturation",
    )


class _Run:
    """One extraction run: the encoder on its device, the slides waiting in a group, the results."""

    def __init__(self, out_dir: Path, encoder: Encoder, options: ExtractOptions, n_slides: int):
        self.out_dir, self.encoder, self.options = out_dir, encoder, options
        self.runner = _Runner(encoder, options)
        self.decoder = DeviceTileDecoder(self.runner.device)
        self.expected = _expected_attrs(encoder, options)
        self.workers = default_workers() if options.num_workers is None else options.num_workers
        self.chunk_size = chunk_size_for(options.batch_size)
        self.target = group_target(options.batch_size, self.workers, self.chunk_size, options.prefetch_factor)
        self.failures_path = out_dir / FAILURES_FILE
        self.results: dict[int, SlideResult] = {}
        self.failures: list[SlideResult] = []
        self.group: list[tuple[int, SlideJob, float]] = []
        self.bar = tqdm(total=n_slides, desc="slides", unit="slide", position=0, disable=not options.progress)

    def _decode_on_device(self, job_id: str, choice: ReaderChoice) -> tuple[bool, dict[str, str]]:
        """Whether the device decodes this slide's tiles, and the attributes saying so."""
        reader, mode = choice.reader, self.options.decode
        if not isinstance(reader, RawTileReader) or mode == "workers":
            return False, {}
        if mode == "auto" and self.runner.device.type != "cuda":
            return False, {}
        reason = self.decoder.check(reader)
        if reason:
            log.warning("%s: %s; its tiles are decoded in the reader processes", job_id, reason)
            return False, {"reader_decode_fallback": reason}
        return True, {"reader_decode": self.decoder.name}

    def _job(self, path: Path) -> SlideJob | SlideResult:
        """The slide's job, or its ``skipped`` result; raises :class:`SlideFailure`."""
        sid, bag = slide_id_of(path), bag_path(self.out_dir, slide_id_of(path))
        skipped = _resume(path, bag, self.options, self.expected)
        if skipped is not None:
            return skipped
        _remove_stale_temps(self.out_dir, sid)
        out_size = self.encoder.input_size or self.options.patch_size
        survey = _survey(path, self.options, out_size)
        plan = survey.plan
        qc = (self.out_dir / QC_DIR / f"{sid}.png", survey.tissue, survey.coords, plan.patch_size_level0,
              f"{sid}: {len(survey.coords)} patches")
        if survey.choice is None:
            raise _no_tissue(survey, qc, self.options)
        if survey.choice.reason:
            log.info("%s: read through openslide (%s)", sid, survey.choice.reason)
        on_device, decode_attrs = self._decode_on_device(sid, survey.choice)
        attrs = {**_bag_attrs(path, self.encoder, self.options, survey, out_size), **survey.choice.provenance,
                 **decode_attrs}
        chunks = PatchChunks(path, survey.coords, plan, out_size, self.chunk_size, assume_mpp=self.options.assume_mpp,
                             reader=survey.choice.reader)
        return SlideJob(sid, path, bag, chunks, attrs, on_device=on_device, qc=qc if self.options.qc else None)

    def _record(self, index: int, result: SlideResult) -> None:
        self.results[index] = result
        if result.status == "failed":
            self.failures.append(result)
            _write_failures(self.failures_path, self.failures)
            log.error("%s: failed at %s: %s", result.slide_id, result.stage, result.reason)
        elif result.status == "done":
            log.info("%s: %d patches in %.1f s (%.1f patches/s)", result.slide_id, result.n_patches, result.seconds,
                     result.n_patches / max(result.seconds, 1e-9))
        else:
            log.info("%s: already extracted, skipped", result.slide_id)
        self.bar.update(1)
        self.bar.set_postfix(done=sum(r.status == "done" for r in self.results.values()), failed=len(self.failures))

    def add(self, index: int, path: Path) -> None:
        """Prepare slide ``index``; its patches are read once its group is full (or the run ends)."""
        t0 = time.perf_counter()
        try:
            job = self._job(path)
        except SlideFailure as err:
            job = SlideResult(slide_id_of(path), path, "failed", seconds=time.perf_counter() - t0, stage=err.stage,
                              reason=err.reason)
        if isinstance(job, SlideResult):
            self._record(index, job)
            return
        self.group.append((index, job, t0))
        if sum(len(j.coords) for _, j, _ in self.group) >= self.target:
            self.flush()

    def flush(self) -> None:
        """Read, encode and write the waiting group of slides."""
        group, self.group = self.group, []
        if not group:
            return
        o = self.options
        outcomes = run_group([j for _, j, _ in group], self.runner, self.decoder, o.batch_size, o.dtype, self.workers,
                             o.prefetch_factor, o.progress)
        for (index, job, t0), failure in zip(group, outcomes):
            seconds = time.perf_counter() - t0
            if failure is None:
                result = SlideResult(job.slide_id, job.path, "done", n_patches=len(job.coords), seconds=seconds,
                                     bag=job.bag)
            else:
                result = SlideResult(job.slide_id, job.path, "failed", seconds=seconds, stage=failure.stage,
                                     reason=failure.reason)
            self._record(index, result)

    def summary(self) -> ExtractSummary:
        """The results in the slides' order; failures.csv written, or removed after a clean run."""
        if self.failures:
            _write_failures(self.failures_path, self.failures)
        else:
            self.failures_path.unlink(missing_ok=True)
        results = [self.results[i] for i in sorted(self.results)]
        return ExtractSummary(results=results, failures_path=self.failures_path if self.failures else None)


def _check_unique_ids(paths: Sequence[Path]) -> None:
    by_id: dict[str, list[Path]] = {}
    for p in paths:
        by_id.setdefault(slide_id_of(p), []).append(p)
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        lines = "\n".join(f"  - {k}: {', '.join(map(str, v))}" for k, v in sorted(dups.items()))
        raise SlideError(f"slide ids must be unique (a bag is named after its slide id); duplicates:\n{lines}")


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
    _check_unique_ids(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(out_dir, encoder, options, len(paths))
    try:
        for index, path in enumerate(paths):
            run.add(index, path)
        run.flush()
    finally:
        run.bar.close()
    return run.summary()

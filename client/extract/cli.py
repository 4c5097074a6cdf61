"""``umeml-client extract``: the argument parser and :func:`run_extract`.

Importing this module is cheap (no torch/openslide), so ``umeml-client --help`` works without
the ``[extract]`` extra; the heavy modules are imported when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when the command runs (torch, openslide)
    from .pipeline import ExtractOptions

__all__ = ["add_extract_arguments", "add_extract_parser", "run_extract"]

DESCRIPTION = """\
Extract patch features from whole-slide images into one feature bag (HDF5) per slide:
<out>/<slide_id>.h5 with 'features' (N x D) and 'coords' (N x 2, level-0 x, y) and provenance
attributes, plus a QC image per slide in <out>/qc/. Runs offline: the encoder is loaded from a
local weights file. Finished slides are skipped on a rerun; failed slides are listed in
<out>/failures.csv and the exit code is 1 when any slide failed."""

EPILOG = """\
examples:
  umeml-client extract --slides /data/slides --out /data/features --encoder resnet50_trunc \\
      --weights /models/resnet50-11ad3fa6.pth
  umeml-client extract --slides slides.txt --out feats_uni --encoder uni_vit_l16 \\
      --weights /models/uni/pytorch_model.bin --magnification 20 --batch-size 256
  umeml-client extract --list-encoders"""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_extract_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``extract`` options to ``p``."""
    io = p.add_argument_group("input and output")
    io.add_argument("--slides", nargs="+", metavar="PATH",
                    help="slide folder(s), slide file(s), or list file(s) (.txt/.csv, one path per line)")
    io.add_argument("--recursive", action="store_true", help="also look for slides in subfolders")
    io.add_argument("--out", metavar="DIR", help="output folder for <slide_id>.h5, qc/ and failures.csv")
    io.add_argument("--overwrite", action="store_true", help="extract again slides that already have a bag")
    io.add_argument("--no-qc", dest="qc", action="store_false", help="do not write QC images")

    enc = p.add_argument_group("encoder")
    enc.add_argument("--encoder", metavar="NAME", help="registered encoder (see --list-encoders)")
    enc.add_argument("--weights", metavar="FILE", help="local weights file (.pth/.pt/.bin/.safetensors)")
    enc.add_argument("--random-init", action="store_true",
                     help="random weights instead of --weights: for tests only, features are meaningless")
    enc.add_argument("--input-size", type=_positive_int, metavar="PX",
                     help="resize patches to this side for the encoder (default: the encoder's, 224 for ViTs, "
                          "the patch size for resnet50_trunc)")
    enc.add_argument("--list-encoders", action="store_true", help="list the registered encoders and exit")

    res = p.add_argument_group("resolution and patches")
    target = res.add_mutually_exclusive_group()
    target.add_argument("--mpp", type=_positive_float, metavar="UM",
                        help="target microns per pixel (default 0.5, about 20x)")
    target.add_argument("--magnification", type=_positive_float, metavar="X",
                        help="target magnification instead of --mpp, e.g. 20 (from the objective power; for "
                             "slides without one, from the pixel size taking 20x = 0.5 um/px)")
    res.add_argument("--patch-size", type=_positive_int, default=256, metavar="PX",
                     help="patch side in pixels at the target resolution (default 256)")
    res.add_argument("--assume-mpp", type=_positive_float, metavar="UM",
                     help="level-0 microns per pixel for slides whose metadata has none (never overrides metadata)")

    tis = p.add_argument_group("tissue")
    tis.add_argument("--min-tissue-fraction", type=_fraction, default=0.5, metavar="F",
                     help="keep patches whose tissue share is at least F (default 0.5)")
    tis.add_argument("--min-saturation", type=int, default=15, metavar="S",
                     help="lowest saturation threshold (0-255) under Otsu's (default 15)")
    tis.add_argument("--min-tissue-area", type=float, default=0.5, metavar="PATCHES",
                     help="drop tissue regions smaller than this many patch areas (default 0.5)")
    tis.add_argument("--max-hole-area", type=float, default=4.0, metavar="PATCHES",
                     help="fill holes in tissue smaller than this many patch areas (default 4)")

    _add_throughput_arguments(p)
    return p


def _add_throughput_arguments(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("throughput")
    run.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="patches per batch (default 64)")
    run.add_argument("--workers", type=int, metavar="N",
                     help="patch-reading processes (default: cores - 1, at most 16; 0 reads in the main process)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    run.add_argument("--reader", choices=["auto", "raw", "openslide"], default="auto",
                     help="patch reader: auto (default) reads JPEG-tiled SVS/TIFF levels from their compressed tiles "
                          "and everything else through openslide; raw insists on the raw-tile reader (a slide it "
                          "cannot read fails, saying why); openslide always uses openslide")
    run.add_argument("--decode", choices=["auto", "workers", "device"], default="auto",
                     help="where the raw reader's JPEG tiles are decoded: auto (on the GPU when extracting on CUDA, "
                          "else in the reader processes), workers, or device (the extraction device, also a CPU)")
    run.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                     help="inference precision (auto: bf16/fp16 autocast on CUDA, fp32 on CPU)")
    run.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                     help="stored feature type (default float16)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def add_extract_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``extract`` on a subcommand parser set; the parser runs :func:`run_extract`."""
    p = subparsers.add_parser(
        "extract", help="extract patch features from slides into feature bags (h5)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_extract_arguments(p)
    p.set_defaults(func=run_extract)
    return p


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("umeml")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def _error(message: str) -> int:
    print(f"umeml-client extract: error: {message}", file=sys.stderr)
    return 2


def _list_encoders() -> int:
    from .encoders import get_encoder_spec, list_encoders

    for name in list_encoders():
        spec = get_encoder_spec(name)
        size = spec.input_size or "patch"
        print(f"{name:16s} dim={spec.feature_dim:<5d} input={size!s:<6s} {spec.description}")
    return 0


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line (beyond what argparse checks), or None."""
    missing = [flag for flag, value in (("--slides", args.slides), ("--out", args.out), ("--encoder", args.encoder))
               if not value]
    if missing:
        return f"the following arguments are required: {', '.join(missing)}"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out}: is a file, not a folder (give a folder to write the bags into)"
    if args.weights is None and not args.random_init:
        return "give --weights FILE (a local file; nothing is downloaded), or --random-init for tests"
    if args.weights is not None and args.random_init:
        return "--weights and --random-init exclude each other"
    return None


def _options(args: argparse.Namespace) -> ExtractOptions:
    from .pipeline import ExtractOptions
    from .tissue import TissueParams

    return ExtractOptions(
        mpp=args.mpp if args.mpp is not None or args.magnification is not None else 0.5,
        magnification=args.magnification,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        precision=args.precision,
        dtype=args.dtype,
        assume_mpp=args.assume_mpp,
        min_tissue_fraction=args.min_tissue_fraction,
        tissue=TissueParams(min_saturation=args.min_saturation, min_area=args.min_tissue_area,
                            max_hole_area=args.max_hole_area),
        overwrite=args.overwrite,
        qc=args.qc,
        progress=args.progress,
        reader=args.reader,
        decode=args.decode,
    )


def _extract(args: argparse.Namespace) -> int:
    from umeml.errors import UmemlError

    from .encoders import load_encoder
    from .pipeline import extract_slides
    from .slides import discover_slides

    log = logging.getLogger("umeml.client.extract")
    try:
        options = _options(args)
        slides = discover_slides(args.slides, recursive=args.recursive)
        if not slides:
            return _error(f"no slide files found in {' '.join(args.slides)}")
        encoder = load_encoder(args.encoder, weights=args.weights, random_init=args.random_init,
                               input_size=args.input_size)
        log.info("extracting %d slide(s) with %s (weights %s) into %s", len(slides), encoder.name,
                 encoder.weights_sha256[:12], args.out)
        summary = extract_slides(slides, args.out, encoder, options)
    except (UmemlError, ValueError) as err:
        return _error(str(err))
    msg = (f"{summary.done} extracted ({summary.n_patches} patches), {summary.skipped} already done, "
           f"{summary.failed} failed")
    if summary.failed:
        msg += f"; see {summary.failures_path}"
    print(msg, file=sys.stderr)
    return 1 if summary.failed else 0


def run_extract(args: argparse.Namespace) -> int:
    """Run an extraction from parsed arguments: 0 when every slide is done or skipped, 1 when any
    slide failed, 2 for a usage or setup problem (nothing extracted)."""
    try:  # the heavy modules: torch, openslide, tifffile
        from . import encoders, pipeline, slides, tissue  # noqa: F401
    except ImportError as err:
        return _error(f"{err}; extraction needs the [extract] extra: pip install 'umeml[extract]'")
    if args.list_encoders:
        return _list_encoders()
    problem = _usage_problem(args)
    if problem:
        return _error(problem)
    _setup_logging(args.quiet)
    return _extract(args)


def build_parser() -> argparse.ArgumentParser:
    """A standalone ``extract`` parser (``python -m umeml.client.extract``)."""
    p = argparse.ArgumentParser(prog="umeml-client extract", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_extract_arguments(p)

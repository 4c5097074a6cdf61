"""Whole-slide images through openslide: discovery, opening, resolution (mpp / magnification).

A slide is opened as a context manager (``with open_slide(path) as slide: ...``) so its file
handle is always released. Its level-0 pixel size comes from ``openslide.mpp-x``/``mpp-y`` (Aperio
``MPP``, TIFF resolution tags, vendor metadata); a slide without one can be given a pixel size with
``assume_mpp``, which never overrides metadata. The objective power comes from
``openslide.objective-power`` (Aperio ``AppMag``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from umeml.errors import UmemlError

__all__ = [
    "SLIDE_EXTENSIONS",
    "Slide",
    "SlideError",
    "SlideResolution",
    "TargetResolution",
    "discover_slides",
    "open_slide",
    "resolve_target",
    "slide_id_of",
]

# File types openslide opens (a .mrxs needs its data folder beside it; DICOM folders are not listed).
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
)
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv")
NOMINAL_MPP_AT_10X = 1.0  # convention: 10x ~ 1.0 um/px, 20x ~ 0.5, 40x ~ 0.25
_MPP_RANGE = (0.01, 100.0)


class SlideError(UmemlError):
    """A slide cannot be opened or read, or lacks what extraction needs; the message names it."""


def slide_id_of(path: str | Path) -> str:
    """Slide id of a slide file: its name without the extension (CLAM/TRIDENT convention)."""
    return Path(path).stem


def _is_slide(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SLIDE_EXTENSIONS


def _read_list(path: Path) -> list[Path]:
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if path.suffix.lower() == ".csv":
            line = line.split(",", 1)[0].strip()
            if line.lower() in {"path", "slide", "slide_path"}:
                continue  # header
        if not line:
            continue
        p = Path(line).expanduser()
        out.append(p if p.is_absolute() else path.parent / p)
    return out


def discover_slides(inputs: Sequence[str | Path] | str | Path, recursive: bool = False) -> list[Path]:
    """Slide files named by ``inputs``: folders (their slide files), list files, or slide files.

    A list file (``.txt``/``.csv``) holds one path per line (relative to the list file; ``#``
    starts a comment; a CSV's first column). Raises :class:`SlideError` for a path that does not
    exist or a listed slide that is missing; returns the slides sorted, duplicates removed.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[Path] = []
    problems: list[str] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(q for q in p.glob(pattern) if _is_slide(q))
        elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
            for q in _read_list(p):
                if q.exists():
                    found.append(q)
                else:
                    problems.append(f"{q} (listed in {p}) does not exist")
        elif p.is_file():
            found.append(p)
        else:
            problems.append(f"{p} does not exist")
    if problems:
        raise SlideError("cannot find slides:\n" + "\n".join(f"  - {m}" for m in problems))
    unique = {q.resolve(): q for q in found}
    return sorted(unique.values(), key=lambda q: (slide_id_of(q), str(q)))


@dataclass(frozen=True)
class SlideResolution:
    """Level-0 pixel size and objective power of a slide, and where the pixel size came from."""

    mpp: float | None
    magnification: float | None
    mpp_source: str  # "metadata", "assumed" or "none"


@dataclass(frozen=True)
class TargetResolution:
    """How level-0 pixels map to the extraction resolution of one slide.

    ``downsample`` = level-0 pixels per output pixel; ``mpp`` and ``magnification`` describe the
    output (``magnification`` nominal where the slide gives only a pixel size, and ``mpp`` None where
    the slide gives only an objective power and no pixel size was assumed).
    """

    downsample: float
    mpp: float | None
    magnification: float | None


def _float_prop(props: dict[str, str], key: str) -> float | None:
    value = props.get(key)
    if value is None:
        return None
    try:
        out = float(value)
    except ValueError:
        return None
    return out if math.isfinite(out) and out > 0 else None


class Slide:
    """An open whole-slide image (use as a context manager; :func:`open_slide` makes one)."""

    def __init__(self, path: str | Path, assume_mpp: float | None = None):
        import openslide

        self.path = Path(path)
        self.slide_id = slide_id_of(self.path)
        if not self.path.exists():
            raise SlideError(f"{self.path}: no such file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as err:
            raise SlideError(f"{self.path}: not a slide format openslide can read ({err})") from err
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(f"{self.path}: cannot open slide ({err})") from err
        self.properties: dict[str, str] = dict(self._osr.properties)
        self.dimensions: tuple[int, int] = tuple(self._osr.dimensions)  # type: ignore[assignment]
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(d) for d in self._osr.level_dimensions)  # type: ignore[misc]
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._osr.level_downsamples)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.resolution = self._resolution(assume_mpp)
        bg = self.properties.get("openslide.background-color")
        self.background = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4)) if bg and len(bg) == 6 else (255, 255, 255)

    def _resolution(self, assume_mpp: float | None) -> SlideResolution:
        mpp_x = _float_prop(self.properties, "openslide.mpp-x")
        mpp_y = _float_prop(self.properties, "openslide.mpp-y")
        mpp = None
        if mpp_x and mpp_y:
            mpp = (mpp_x + mpp_y) / 2
        elif mpp_x or mpp_y:
            mpp = mpp_x or mpp_y
        if mpp is not None and not (_MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]):
            mpp = None  # implausible metadata (e.g. a TIFF resolution of 1 pixel per unit)
        source = "metadata"
        if mpp is None and assume_mpp is not None:
            mpp, source = float(assume_mpp), "assumed"
        elif mpp is None:
            source = "none"
        mag = _float_prop(self.properties, "openslide.objective-power")
        return SlideResolution(mpp=mpp, magnification=mag, mpp_source=source)

    # -- context manager -------------------------------------------------------------------
    def close(self) -> None:
        """Release the slide's file handle."""
        osr, self._osr = getattr(self, "_osr", None), None
        if osr is not None:
            osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for(self, downsample: float) -> int:
        """Highest pyramid level whose downsample does not exceed ``downsample`` (never upsample)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = i
        return best

    def read_image(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> "Image.Image":
        """An RGB PIL image of ``size`` pixels at ``level``, corner at level-0 ``location``.

        Transparent pixels (outside the scanned area) are painted with the slide's background
        colour (white unless the slide says otherwise).
        """
        if self._osr is None:
            raise SlideError(f"{self.path}: slide is closed")
        import openslide

        try:
            region = self._osr.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as err:
            raise SlideError(f"{self.path}: cannot read region {location} at level {level} ({err})") from err
        alpha = region.getchannel("A")
        if alpha.getextrema()[0] == 255:
            return region.convert("RGB")
        out = Image.new("RGB", region.size, self.background)
        out.paste(region, mask=alpha)
        return out

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """:meth:`read_image` as an H x W x 3 uint8 array."""
        return np.asarray(self.read_image(location, level, size))


def open_slide(path: str | Path, assume_mpp: float | None = None) -> Slide:
    """Open a slide with openslide; raise :class:`SlideError` naming the file when it cannot be."""
    if assume_mpp is not None and not (_MPP_RANGE[0] <= assume_mpp <= _MPP_RANGE[1]):
        raise SlideError(f"assumed mpp {assume_mpp} is outside the plausible range {_MPP_RANGE}")
    return Slide(path, assume_mpp=assume_mpp)


def resolve_target(
    slide_res: SlideResolution, path: str | Path, mpp: float | None = None, magnification: float | None = None
) -> TargetResolution:
    """Level-0 downsample for a target ``mpp`` or ``magnification`` (exactly one is given).

    A target pixel size needs the slide's pixel size (metadata or ``--assume-mpp``). A target
    magnification uses the objective power when the slide has one, else the pixel size with the
    usual convention (20x = 0.5 um/px). Raises :class:`SlideError` with what to do otherwise.
    """
    if (mpp is None) == (magnification is None):
        raise ValueError("give exactly one of mpp and magnification")
    hint = (
        "pass --assume-mpp UM_PER_PIXEL (e.g. 0.25 for a 40x scan, 0.5 for 20x) if you know the "
        "scanner's pixel size"
    )
    if mpp is not None:
        if slide_res.mpp is None:
            extra = (
                f"; or use --magnification, since it reports an objective power of {slide_res.magnification:g}x"
                if slide_res.magnification
                else ""
            )
            raise SlideError(f"{path}: the slide has no pixel size (mpp) in its metadata; {hint}{extra}")
        ds = mpp / slide_res.mpp
        if slide_res.magnification:
            mag = slide_res.magnification / ds
        else:
            mag = NOMINAL_MPP_AT_10X * 10 / mpp
        return TargetResolution(downsample=ds, mpp=float(mpp), magnification=float(mag))
    assert magnification is not None
    if slide_res.magnification:
        ds = slide_res.magnification / magnification
        out_mpp = slide_res.mpp * ds if slide_res.mpp else None
        return TargetResolution(downsample=ds, mpp=out_mpp, magnification=float(magnification))
    if slide_res.mpp is not None:
        nominal = NOMINAL_MPP_AT_10X * 10 / magnification
        return TargetResolution(downsample=nominal / slide_res.mpp, mpp=nominal, magnification=float(magnification))
    raise SlideError(f"{path}: the slide has neither a pixel size (mpp) nor an objective power in its metadata; {hint}")

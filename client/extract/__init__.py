"""Site-side whole-slide feature extraction: slides -> tissue grid -> encoder -> feature bags.

``umeml-client extract`` is the command line (:mod:`umeml.client.extract.cli`); the pieces are
:mod:`.slides` (openslide, resolution), :mod:`.tissue` (segmentation), :mod:`.grid` (patch grid
and pyramid level), :mod:`.readers` (which reader reads a slide's patches: :mod:`.rawtiles`, the
raw-tile reader for JPEG-tiled SVS/TIFF levels, or openslide), :mod:`.devicedecode` (raw tiles
decoded on the GPU), :mod:`.encoders` (registry, offline weights), :mod:`.stream` (slides
streamed through the encoder, several at once when small), :mod:`.pipeline` (the run: resume,
failures) and :mod:`.qc` (QC images).

The names below are imported on first use, so importing this package (e.g. for the CLI's
``--help``) does not import torch or openslide.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Encoder",
    "EncoderError",
    "ExtractOptions",
    "ExtractSummary",
    "SlideError",
    "SlideResult",
    "TissueParams",
    "discover_slides",
    "extract_slides",
    "list_encoders",
    "load_encoder",
    "open_slide",
    "register_encoder",
]

_WHERE = {
    "Encoder": "encoders",
    "EncoderError": "encoders",
    "list_encoders": "encoders",
    "load_encoder": "encoders",
    "register_encoder": "encoders",
    "ExtractOptions": "pipeline",
    "ExtractSummary": "pipeline",
    "SlideResult": "pipeline",
    "extract_slides": "pipeline",
    "SlideError": "slides",
    "discover_slides": "slides",
    "open_slide": "slides",
    "TissueParams": "tissue",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Redaction of error text that leaves a site: no local path, case id or slide id.

When a site's handler fails, Flower sends the exception's text to the coordinator as the error
reply's reason. Exception messages routinely carry file paths (``/data/bags/<slide>.h5``) and
identifiers; :func:`redact` removes them, and the site keeps the full text in its own log.
"""

from __future__ import annotations

import re
from typing import Iterable

PATH = "<path>"
ID = "<id>"

# an absolute POSIX path (/x/y), a home-relative one (~/x) or a Windows drive path (C:\x, C:/x),
# not preceded by a word character (so "3/4" or "km/h" stay); it ends at whitespace, a quote,
# a bracket or a colon, which is where exception messages end them
_PATH = re.compile(r"""(?<![\w.~/-])(?:~|[A-Za-z]:)?[/\\](?=[^\s/\\])[^\s'"`<>()\[\]{},;:|]*""")
_FILE_URL = re.compile(r"file://\S+")
# TCGA barcodes (case, sample, slide: TCGA-02-0001-01Z-00-DX1...), even when the site's own ids
# are not known yet (the cohort failed to load)
_TCGA = re.compile(r"TCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4}[A-Za-z0-9.-]*")
MIN_ID_LENGTH = 3  # shorter ids ("1", "A") would redact ordinary words and numbers


def redact(text: str, ids: Iterable[str] = ()) -> str:
    """``text`` with absolute paths replaced by ``<path>`` and identifiers by ``<id>``.

    ``ids`` are the site's known case and slide ids (matched as whole tokens, longest first);
    TCGA barcodes are recognised without them. A basename is not kept: for a bag it is the
    slide id.
    """
    out = _FILE_URL.sub(PATH, str(text))
    out = _PATH.sub(PATH, out)
    known = sorted({i for i in ids if i and len(i) >= MIN_ID_LENGTH}, key=len, reverse=True)
    if known:
        pattern = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(i) for i in known) + r")(?![\w])")
        out = pattern.sub(ID, out)
    return _TCGA.sub(ID, out)

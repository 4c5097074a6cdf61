"""A cheap fingerprint of the files a cohort is read from, to tell whether a loaded cohort is stale.

A resident site process keeps its cohort in memory across messages and runs; before each
message it compares the fingerprint of the files with the one taken when the cohort was loaded
and reloads on any difference. The fingerprint covers name, size and modification time (ns) of
every file of the source (a data directory with its ``bags/``, or the table, signatures and bag
folder), not their content: one ``stat`` per file, milliseconds for thousands of bags.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from umeml.data.source import CohortSource


def _entries(path: Path, depth: int) -> Iterable[str]:
    """``name size mtime_ns`` of ``path`` and, for a folder, of what it holds (``depth`` levels)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        yield f"{path} missing"
        return
    if not path.is_dir():
        yield f"{path} {st.st_size} {st.st_mtime_ns}"
        return
    yield f"{path}/"  # the listing below shows added and removed files
    if depth == 0:
        return
    with os.scandir(path) as it:
        children = sorted(it, key=lambda e: e.name)
    for child in children:
        yield from _entries(Path(child.path), depth - 1)


def cohort_fingerprint(source: CohortSource, extra: Iterable[str | None] = ()) -> str:
    """A digest that changes when any file of ``source`` (or the ``extra`` files, e.g. the site
    map) is added, removed, resized or modified."""
    paths = [source.data_dir] if source.data_dir is not None else [source.table, source.signatures, source.bags]
    digest = hashlib.sha256()
    for p in [*paths, *extra]:
        if p is None:
            continue
        # a data directory: its files and bags/ (two levels); a bag folder: its files (one level)
        depth = 2 if p == source.data_dir else 1
        for line in _entries(Path(p), depth):
            digest.update(line.encode(errors="surrogateescape") + b"\n")
    return digest.hexdigest()

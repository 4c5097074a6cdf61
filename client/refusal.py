"""A site the coordinator refused: the reason, kept where ``umeml-client start`` sees it.

The coordinator tells a node it refuses (a site id that differs from its registered key's
name, a site id another connected node holds) with a ``query.refused`` message. The ClientApp,
which Flower runs in a process of its own, writes the reason to ``STATE_DIR/refused.json``;
``umeml-client start`` watches for that file, prints the reason, stops its SuperNode and exits
with :data:`REFUSED_EXIT` (otherwise the refused SuperNode would keep polling for nothing).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Callable

from umeml.rundir import atomic_write_json

REFUSED_FILE = "refused.json"
REFUSED_EXIT = 3  # the coordinator refused this site (1: data problems, 2: usage errors)

log = logging.getLogger("umeml.client")


def record_refusal(state_dir: str | None, site_id: str, reason: str) -> dict:
    """Log the coordinator's reason and keep it in the site's state folder (when it has one)."""
    log.error("site %s: the coordinator refused this node: %s", site_id, reason)
    if state_dir is not None:
        atomic_write_json(Path(state_dir) / REFUSED_FILE, {"site": site_id, "reason": reason})
    return {"site": site_id, "acknowledged": True}


def watch_refusal(state_dir: Path, on_refused: Callable[[str], None], poll: float = 1.0) -> threading.Event:
    """Call ``on_refused(reason)`` once ``state_dir/refused.json`` appears (a stale one is
    removed first); returns the event that stops the watching."""
    path = Path(state_dir) / REFUSED_FILE
    path.unlink(missing_ok=True)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll):
            if path.is_file():
                try:
                    reason = str(json.loads(path.read_text()).get("reason", "no reason given"))
                except (OSError, ValueError):
                    continue  # being written: read it on the next poll
                on_refused(reason)
                return

    threading.Thread(target=watch, daemon=True).start()
    return stop

"""Where a run's log lines go: all of them to the run's log file, only what a user reads to the console.

Flower and Ray log at INFO and DEBUG on every round (``configure_train: Sampled 3 nodes``, actor
pools, backend configs). Flower's own console handler on the ``flwr`` logger printed each line
once, and the root handler umeml's ServerApp set up printed it a second time. During a run
(:func:`run_logging`) there is one console handler, on the root logger, at the console level
(WARNING unless ``--verbose`` / ``--log-level`` says otherwise), and one file handler that
receives everything: umeml's loggers from INFO, Flower's from DEBUG, Python warnings (through
``logging.captureWarnings``). Flower's stream handlers are detached for the run and put back
afterwards, so nothing is printed twice at any level.

Two of Flower's lines are handled on purpose, both matched by their text (Flower 1.42; the
tests in ``tests/test_logs.py`` fail when an upgrade changes them):

- ``DEPRECATED FEATURE: The `run_simulation` function is deprecated``: Flower 1.42's successor is
  ``flwr run`` against a SuperLink started with the simulation runtime, a separate process that
  loads the apps from an installed FAB by their module path. umeml's simulation builds its
  ServerApp and ClientApp in this process from the cohort and settings it holds (a synthetic
  cohort, a ``SimulatedSites`` table), and its tests drive it in-process, so it stays on
  ``run_simulation``; the notice is kept out of the console (a user cannot act on it) and goes
  to the log file.
- ``fraction_evaluate is set to 0.0. Federated evaluation will be skipped.``: umeml sends its own
  evaluation messages (held-out sites and training sites' validation, every
  ``federation.evaluate_every`` rounds), so Flower's strategy-driven evaluation round is off on
  purpose. Read as it stands, the line contradicts the held-out table that follows; it is
  reworded (at INFO) to say what happens instead.

Python's DeprecationWarning, PendingDeprecationWarning and FutureWarning (Ray's
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` tip, for one) are notices to the developers of the
libraries umeml calls, not to its users: they go to the log file only. Every other warning and
every error still reaches the console.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["CONSOLE_LEVELS", "console_level", "parse_level", "run_logging", "set_console_level"]

CONSOLE_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
# the loggers whose every line goes to the file (their own levels: umeml INFO, Flower DEBUG)
FILE_LEVELS = {"umeml": logging.INFO, "flwr": logging.DEBUG}
DEVELOPER_WARNINGS = ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning")
FLOWER_DEPRECATION = "DEPRECATED FEATURE"
FLOWER_NO_EVALUATION = "Federated evaluation will be skipped"
EVALUATION_NOTE = ("Flower's own evaluation round is off (fraction_evaluate 0): umeml evaluates the held-out "
                   "sites and the training sites' validation itself every federation.evaluate_every rounds")

_console = {"level": logging.WARNING}


def parse_level(text: str) -> int:
    """A console level by name (``debug``, ``INFO`` ...); ValueError naming the choices otherwise."""
    name = str(text).upper()
    if name not in CONSOLE_LEVELS:
        raise ValueError(f"log level {text!r}: use one of {', '.join(CONSOLE_LEVELS)}")
    return logging.getLevelName(name)


def set_console_level(level: int | str) -> None:
    """The console level of later runs (the command line's ``--verbose`` / ``--log-level``)."""
    _console["level"] = parse_level(level) if isinstance(level, str) else int(level)


def console_level() -> int:
    """The console level runs use now (WARNING unless :func:`set_console_level` changed it)."""
    return _console["level"]


class _RewordFlowerNotices(logging.Filter):
    """On the ``flwr`` logger: rewrite the 'evaluation will be skipped' warning (see the module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if FLOWER_NO_EVALUATION in record.getMessage():
            record.msg, record.args = EVALUATION_NOTE, ()
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class _ConsoleOnly(logging.Filter):
    """On the console handler: drop what only developers can act on (it still reaches the file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.name == "py.warnings":
            return not any(f"{kind}:" in text for kind in DEVELOPER_WARNINGS)
        if record.name.startswith("flwr") and text.startswith(FLOWER_DEPRECATION) and "run_simulation" in text:
            return False
        return True


class _Forward(logging.Handler):
    """Ray's logger does not propagate, and ``ray.init`` sets its own format on every handler of
    that logger: this one hands Ray's records to the run's file handler, which keeps its format."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def _prints(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to the terminal (pytest's capture handlers write to a buffer: kept)."""
    return getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


@contextmanager
def run_logging(log_file: str | Path, level: int | None = None) -> Iterator[Path]:
    """Route every log line of the block to ``log_file`` (appended) and the console at ``level``
    (default :func:`console_level`); everything is put back as it was afterwards."""
    level = console_level() if level is None else level
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root, flower = logging.getLogger(), logging.getLogger("flwr")
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    console = logging.StreamHandler()
    console.setLevel(level)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    console.addFilter(_ConsoleOnly())
    reword = _RewordFlowerNotices()
    # Flower's ConsoleHandler, and a terminal handler an earlier command in this process (umeml
    # extract's) put on the umeml logger with propagate off: each would print lines a second time
    # or keep them from the file
    own = {name: logging.getLogger(name) for name in FILE_LEVELS}
    detached = {name: [h for h in lg.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
                for name, lg in own.items()}
    saved_levels = {name: lg.level for name, lg in own.items()}
    saved_propagate = {name: lg.propagate for name, lg in own.items()}
    saved_root = root.handlers[:]
    for name, lg in own.items():
        for h in detached[name]:
            lg.removeHandler(h)
        lg.propagate = True
    # a handler umeml's ServerApp or a library put on the root would print each line again
    root.handlers = [h for h in saved_root if not _prints(h)]
    root.addHandler(file_handler)
    ray, to_file = logging.getLogger("ray"), _Forward(file_handler)
    ray.addHandler(to_file)
    root.addHandler(console)
    flower.addFilter(reword)
    for name, lvl in FILE_LEVELS.items():
        logging.getLogger(name).setLevel(min(lvl, level))
    logging.captureWarnings(True)
    try:
        yield log_file
    finally:
        logging.captureWarnings(False)
        flower.removeFilter(reword)
        root.handlers = saved_root
        ray.removeHandler(to_file)
        for name, lg in own.items():
            lg.setLevel(saved_levels[name])
            lg.propagate = saved_propagate[name]
            for h in detached[name]:
                lg.addHandler(h)
        file_handler.close()

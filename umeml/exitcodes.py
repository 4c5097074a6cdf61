"""The exit-code rule every command follows, in one place: ``umeml``, ``umeml-server`` and
``umeml-client`` run their subcommands through :func:`run_main`.

- 0: done;
- 1: a data problem was found (every problem listed at once), or a run failed;
- 2: a usage error: the command line, or a file it names, is wrong (found before any data is read);
- 3: an internal error (a bug): one line names the log file that holds the traceback.

No user input ever prints a traceback: umeml's own errors (:class:`~umeml.errors.UmemlError`)
carry their exit code, an OSError (a path that cannot be read or written) is a usage error, and
anything else is a bug whose traceback goes to a log file instead of the console.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from umeml.errors import MissingPathError, UmemlError, UsageError

OK, DATA_PROBLEM, USAGE_ERROR, INTERNAL_ERROR = 0, 1, 2, 3
INTERRUPTED = 130  # the shell's code for SIGINT


def run_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand (``args.func``); return the exit code.

    argparse's own exits (``--help``, a usage error) are returned, not raised, so ``main(argv)``
    can be called in-process.
    """
    try:
        args = parser.parse_args(argv)
        return int(args.func(args))
    except SystemExit as exc:
        return _system_exit_code(exc)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except UmemlError as err:
        print(f"error: {err}", file=sys.stderr)
        return int(getattr(err, "exit_code", DATA_PROBLEM))
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return USAGE_ERROR
    except Exception:  # noqa: BLE001 - a bug: the traceback goes to a log file, the console gets one line
        log = write_internal_log(parser.prog, argv)
        print(f"{parser.prog}: internal error, please report: {log}", file=sys.stderr)
        return INTERNAL_ERROR


def _system_exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return OK
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)  # sys.exit("message") convention
    return DATA_PROBLEM


def describe_os_error(err: OSError) -> str:
    """``path: reason`` for an OSError (``strerror`` without the errno noise)."""
    reason = err.strerror or str(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def write_internal_log(prog: str, argv: Sequence[str] | None) -> Path:
    """Write the exception being handled, with the command line and version, to a log file in
    the temporary folder; return its path."""
    from umeml import __version__

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    fd, name = tempfile.mkstemp(prefix=f"{prog}-internal-error-{stamp}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"{prog} {__version__}, python {sys.version.split()[0]}\n")
        f.write(f"command line: {prog} {' '.join(sys.argv[1:] if argv is None else map(str, argv))}\n\n")
        f.write(traceback.format_exc())
    return Path(name)


# ------------------------------------------------------------------ output folders
def check_out_dir(path: Path | None, flag: str = "--out") -> None:
    """An output folder must not be an existing file (UsageError naming the flag)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a folder (give a folder to write into)")


def check_run_dir(path: Path, overwrite: bool, flag: str = "--out", resume_hint: bool = False) -> list[str]:
    """Refuse to write a new run into ``path`` when it holds an earlier run's results, unless
    ``overwrite``; return the earlier outputs ``overwrite`` will replace (empty when none)."""
    from umeml.rundir import RunDir

    check_out_dir(path, flag)
    found = RunDir(path).existing_outputs()
    if found and not overwrite:
        hint = " or --resume to continue it" if resume_hint else ""
        raise UsageError(f"{flag} {path}: holds a finished run ({', '.join(found)}); choose a new folder, or give "
                         f"--overwrite to replace it{hint}")
    return found


def replace_run_dir(path: Path, found: list[str]) -> None:
    """Remove the earlier run's outputs ``found`` (names from :func:`check_run_dir`) before a new run
    writes its own, saying what goes; nothing else in the folder is touched."""
    import shutil

    if not found:
        return
    print(f"--overwrite: replacing the earlier run in {path}: removing {', '.join(found)}", file=sys.stderr)
    for name in found:
        target = Path(path) / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def require_path(path: str | Path, flag: str, kind: str = "file") -> None:
    """A path named by ``flag`` must exist and be a ``kind`` ("file" or "folder")."""
    p = Path(path)
    if not p.exists():
        raise MissingPathError(f"{flag} {path}: not found")
    if kind == "file" and p.is_dir():
        raise MissingPathError(f"{flag} {path}: is a directory, not a file")
    if kind == "folder" and not p.is_dir():
        raise MissingPathError(f"{flag} {path}: is a file, not a directory")

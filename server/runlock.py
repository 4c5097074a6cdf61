"""One coordinator per run directory: its lock file, and the orphans an earlier one left.

``coordinator.lock`` in the run dir holds the live coordinator's process ids (its own, the
SuperLink's and the watchdog's) as JSON, and an exclusive ``flock`` on it while the coordinator
lives. The kernel drops the flock when the process dies, however it dies, so a lock left by a
killed coordinator never blocks a resume; the ids in it still say which processes were its own.

Orphans are found by environment, not by the ids in the file: every Flower process of a
deployment runs with ``FLWR_HOME`` set to the run dir's ``flower/`` folder (the SuperLink, and
the SuperExec and ServerApps it starts in sessions of their own).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from umeml.errors import UmemlError
from umeml.flower.processes import command_line, processes_with_env, start_watchdog, stop_pids, stop_watchdog
from umeml.rundir import RunDir


class RunDirBusy(UmemlError):
    """The run directory is in use: a live coordinator holds it, or an earlier one's Flower
    processes still run (``--force`` stops those)."""


class CoordinatorLock:
    """The exclusive lock of a run dir, held while this coordinator runs (:meth:`acquire`)."""

    def __init__(self, files: RunDir):
        self.files = files
        self.info: dict = {}
        self._fd: int | None = None

    def acquire(self) -> "CoordinatorLock":
        """Take the lock or raise :class:`RunDirBusy` naming the coordinator that holds it."""
        path = self.files.lock
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _read_lock(path)
            os.close(fd)
            raise RunDirBusy(f"{self.files.root} is in use by the coordinator with process id "
                             f"{held.get('coordinator_pid', '?')} (started {held.get('started', '?')}, "
                             f"{path}); stop it first, or use another --out") from None
        self._fd = fd
        self.info = {"coordinator_pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write()
        return self

    def update(self, **pids: int) -> None:
        """Add process ids (``superlink_pid=...``) to the lock file."""
        self.info.update(pids)
        self._write()

    def _write(self) -> None:
        # written in place: the flock belongs to this file, a rename would make a new one
        data = json.dumps(self.info, indent=2).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Remove the lock file and drop the lock (a normal end of the coordinator)."""
        if self._fd is None:
            return
        self.files.lock.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _read_lock(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def find_orphans(files: RunDir) -> dict[int, str]:
    """Flower processes of this run dir still running: process id -> command line."""
    home = str(files.flower_state.resolve())
    return {pid: command_line(pid) for pid in processes_with_env("FLWR_HOME", home)}


def handle_orphans(files: RunDir, force: bool, printer=print, grace: float = 10.0) -> None:
    """Refuse to start over an earlier coordinator's Flower processes, or stop them (``force``).

    Call it holding the lock: then no live coordinator owns them. Without ``force`` it raises
    :class:`RunDirBusy` listing them; a second SuperLink on the same database and port would
    otherwise fail to bind while the old one takes the new run (two ServerApps, one run dir).
    """
    orphans = find_orphans(files)
    if not orphans:
        return
    listing = "\n".join(f"  - pid {pid}: {cmd[:160]}" for pid, cmd in sorted(orphans.items()))
    if not force:
        previous = _read_lock(files.lock).get("coordinator_pid", "?")
        raise RunDirBusy(f"{len(orphans)} Flower process(es) of {files.root} left by an earlier coordinator "
                         f"(pid {previous}) still run:\n{listing}\nstop them (--force does) before resuming")
    printer(f"--force: stopping {len(orphans)} Flower process(es) an earlier coordinator left:\n{listing}")
    killed = stop_pids(sorted(orphans), grace)
    if killed:
        printer(f"  killed (no exit within {grace:.0f} s of SIGTERM): {killed}")


class RunGuard:
    """What a deployment's coordinator holds while it runs: the run dir's lock (refusing a live
    coordinator), no orphans of an earlier one (refused, or stopped with ``force``) and a
    watchdog that stops the run's Flower processes should this process die."""

    def __init__(self, files: RunDir, force: bool = False, printer=print):
        self.files, self.force, self.printer = files, force, printer
        self.lock = CoordinatorLock(files)
        self.watchdog = None

    def __enter__(self) -> "RunGuard":
        self.lock.acquire()
        try:
            handle_orphans(self.files, self.force, self.printer)
            self.watchdog = start_watchdog(self.files.flower_state)
        except BaseException:
            self.lock.release()
            raise
        self.lock.update(watchdog_pid=self.watchdog.pid)
        return self

    def started(self, link) -> None:
        """Record the SuperLink's process id in the lock file."""
        if link.proc is not None:
            self.lock.update(superlink_pid=link.proc.pid)

    def __exit__(self, *exc) -> None:
        if self.watchdog is not None:
            stop_watchdog(self.watchdog)  # stops what the SuperLink left (SuperExec, ServerApp)
        self.lock.release()

"""``umeml-server simulate`` run under a supervisor, so that SIGTERM stops it within seconds.

A simulation's process is a poor place to handle signals: ``ray.init`` replaces the SIGTERM
handler with one that raises ``SystemExit`` in the main thread, and Flower runs the ServerApp
in a non-daemon thread that the interpreter then waits for, so the run went on (for minutes,
during Ray's start-up too). The console script therefore runs the simulation as a child in a
process group of its own and does nothing but wait for it: a SIGTERM or SIGINT is passed on
to the child's group, and after ``grace`` seconds the group (the simulation and Ray's raylet,
GCS and workers, which Ray keeps in it and kills with their parent) is sent SIGKILL. Every
completed round is in the run dir already (atomic writes), so ``--resume`` continues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SUPERVISED_ENV = "UMEML_SUPERVISED"


def run_supervised(cmd: list[str], grace: float = 5.0) -> int:
    """Run ``cmd`` in its own process group until it exits; returns its exit code (143 when a
    SIGTERM, 130 when a SIGINT stopped it)."""
    child = subprocess.Popen(cmd, env={**os.environ, SUPERVISED_ENV: "1"}, start_new_session=True)
    stop: dict = {}

    def forward(signum, _frame):
        stop.setdefault("signal", signum)
        stop.setdefault("deadline", time.monotonic() + grace)
        _signal_group(child.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                rc = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if "deadline" in stop and time.monotonic() > stop["deadline"]:
                    print(f"umeml-server: the simulation did not stop within {grace:.0f} s; killing it",
                          file=sys.stderr)
                    _signal_group(child.pid, signal.SIGKILL)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _signal_group(child.pid, signal.SIGKILL)  # whatever the child left in its group
    if "signal" in stop:
        return 128 + int(stop["signal"])
    return rc if rc >= 0 else 128 - rc


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass

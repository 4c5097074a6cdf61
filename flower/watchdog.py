"""``python -m umeml.flower.watchdog FLWR_HOME GRACE``: stops a run's Flower processes once the
coordinator that started it is gone.

Started by :func:`umeml.flower.processes.start_watchdog` with a pipe on its stdin. The read
returns at end of file, which happens when the coordinator closes the pipe or dies (the kernel
closes a dead process's descriptors, SIGKILL included). Then every process of this user whose
``FLWR_HOME`` is the run's Flower folder is sent SIGTERM and, after GRACE seconds, SIGKILL.
Flower starts its SuperExec in a session of its own, so killing the SuperLink's process group
would miss it; matching the environment finds every process of the run, in any session.
"""

from __future__ import annotations

import signal
import sys

from umeml.flower.processes import processes_with_env, stop_pids


def main(argv: list[str] | None = None) -> int:
    """Wait for end of file on stdin, then stop the processes of FLWR_HOME."""
    home, grace = (argv if argv is not None else sys.argv[1:])[:2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the coordinator, not this
    while sys.stdin.buffer.read(4096):
        pass
    stop_pids(processes_with_env("FLWR_HOME", home), float(grace))
    return 0


if __name__ == "__main__":
    sys.exit(main())

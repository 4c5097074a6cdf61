"""Flower's processes (SuperLink, SuperNode, ``flwr``): their environment, ports and shutdown."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes: own home, no telemetry, no update check, no installs."""
    env = dict(os.environ)
    env.update({
        # absolute, so that a process of this home is recognised by its environment (orphans)
        "FLWR_HOME": str(Path(flwr_home).resolve()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # SuperExec polls for new tasks every second by default; 0.25 s waits less without
        # burning a 2-core machine on idle polls (one SuperExec per node)
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25"),
        "PYTHONUNBUFFERED": "1",
    })
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a listening socket could bind ``host:port`` now (``host`` as the SuperLink takes it)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT does not count
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something listens on host:port; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {host}:{port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM (Flower leaves gracefully), then SIGKILL the whole process group after ``grace``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def which_or_fail(name: str) -> str:
    """Absolute path of a Flower executable next to this Python, or a clear error."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: is flwr installed in this environment?")
    return found


def die_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive the process starting it (Linux).

    ``PR_SET_PDEATHSIG`` makes the kernel send the child SIGTERM the moment its parent dies, even
    by SIGKILL, when no handler of the parent can run. Elsewhere it does nothing (the run's
    watchdog, :mod:`umeml.flower.watchdog`, still stops the child).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def processes_with_env(name: str, value: str) -> list[int]:
    """Ids of this user's live processes whose environment has ``name=value`` (Linux ``/proc``;
    other users' processes cannot be read and are left out; empty where there is no ``/proc``)."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        if wanted in env.split(b"\0") and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return sorted(found)


def command_line(pid: int) -> str:
    """A process's command line as text (empty once it has gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie has exited; only its parent's wait is missing
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_pids(pids: list[int], grace: float = 10.0) -> list[int]:
    """SIGTERM each process, SIGKILL those still alive after ``grace``; returns those killed."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if _alive(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


def start_watchdog(flwr_home: Path, grace: float = 10.0) -> subprocess.Popen:
    """A watchdog that stops every process of ``flwr_home`` once this process dies.

    It reads a pipe from this process; the kernel closes the pipe when this process ends in any
    way (SIGKILL included), and the watchdog then stops all processes whose ``FLWR_HOME`` is
    ``flwr_home``: the SuperLink, the SuperExec and ServerApps it started in sessions of their
    own. It runs in a session of its own too, so that killing this process's group spares it.
    Keep the returned Popen referenced; closing its stdin (:func:`stop_watchdog`) is a normal end.
    """
    cmd = [sys.executable, "-m", "umeml.flower.watchdog", str(Path(flwr_home).resolve()), str(grace)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)


def stop_watchdog(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """End a watchdog normally: it stops what is left of its processes and exits."""
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)

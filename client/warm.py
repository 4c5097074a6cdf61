"""``umeml-client start``'s side of the warm site runtime: the launcher and the supervisor.

The SuperNode's SuperExec starts ``flwr-clientapp ... --token TOKEN`` for every message. For a
site started with the resident runtime (the default), the first ``flwr-clientapp`` on the
SuperNode's ``PATH`` is a launcher written here: a stdlib-only script (Python started with
``-I -S``, tens of milliseconds) that hands its command line to the resident process
(:mod:`umeml.client.resident`) over a Unix socket in a private folder and exits. When the
resident process is not there (starting, restarting, refused), the launcher runs Flower's own
``flwr-clientapp`` with the same arguments instead, so a message is always served (through
:mod:`umeml.flower.clientapp_main`, which shortens Flower's object-pull backoff first).

:class:`ResidentRuntime` starts the resident process, restarts it when it dies (with a growing
pause) and stops it with the site. This module imports neither torch nor flwr, so the
``umeml-client start`` process stays small.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from umeml.client.resident import EXIT_FLOWER_MISMATCH

LAUNCHER = '''#!{python} -IS
"""flwr-clientapp for a umeml site with a resident runtime (written by umeml-client start).

Hands this command line (the SuperExec's token for one message) to the site's resident
process; runs Flower's own flwr-clientapp when that process cannot take it."""
import json, os, socket, sys

SOCKET = {socket!r}
FLOWER = {flower!r}  # the command standing for Flower's flwr-clientapp (its arguments appended)


def main():
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(SOCKET)
            s.sendall(json.dumps({{"argv": sys.argv[1:]}}).encode() + b"\\n")
            answer = s.makefile("rb").readline().decode(errors="replace").strip()
    except OSError as err:
        answer = "unreachable: " + str(err)
    if answer == "accepted":
        return
    sys.stderr.write("umeml: resident site runtime " + (answer or "gave no answer")
                     + "; this message runs in Flower's own flwr-clientapp\\n")
    sys.stderr.flush()
    os.execv(FLOWER[0], [*FLOWER, *sys.argv[1:]])


main()
'''


def write_launcher(folder: Path, socket_path: Path, flower_clientapp: list[str]) -> Path:
    """Write the ``flwr-clientapp`` launcher into ``folder`` (put first on the SuperNode's PATH);
    ``flower_clientapp``: the command it runs when the resident process cannot take a message."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flwr-clientapp"
    path.write_text(LAUNCHER.format(python=sys.executable, socket=str(socket_path), flower=list(flower_clientapp)))
    path.chmod(0o700)
    return path


class ResidentRuntime:
    """The site's resident runtime process, kept alive for as long as the site runs.

    ``log_path`` receives the resident process's output (which messages it served, restarts).
    """

    def __init__(self, site_file: Path, experiment: Path | None, log_path: Path, env: dict[str, str],
                 max_pause: float = 30.0):
        self.site_file = Path(site_file).resolve()
        self.experiment = Path(experiment).resolve() if experiment is not None else None
        self.log_path = Path(log_path)
        self.env = dict(env)
        self.max_pause = max_pause
        self.folder = Path(tempfile.mkdtemp(prefix="umeml-site-"))  # 0700; a short path (Unix sockets: 108 bytes)
        self.socket = self.folder / "resident.sock"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def command(self) -> list[str]:
        """The resident process's command line."""
        cmd = [sys.executable, "-m", "umeml.client.resident", "--socket", str(self.socket), "--site", str(self.site_file)]
        if self.experiment is not None:
            cmd += ["--config", str(self.experiment)]
        return cmd

    def start(self, flower_clientapp: list[str], ready_timeout: float = 300.0) -> bool:
        """Write the launcher, start the resident process and its supervisor; True once it is
        ready (False: it did not come up in time or exited; messages then run in Flower's own
        processes until a restart succeeds)."""
        write_launcher(self.folder / "bin", self.socket, flower_clientapp)
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()
        return self.wait_ready(ready_timeout)

    def superexec_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the launcher first on ``PATH`` (the SuperNode and its SuperExec inherit it)."""
        out = dict(env)
        out["PATH"] = str(self.folder / "bin") + os.pathsep + out.get("PATH", "")
        return out

    def wait_ready(self, timeout: float) -> bool:
        """Block until the resident process listens (True), exits or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                proc = self.proc
            if self.socket.exists():
                return True
            if proc is not None and proc.poll() is not None and self.starts == 1:
                return False
            time.sleep(0.1)
        return False

    def _spawn(self) -> None:
        with self._lock:
            self.socket.unlink(missing_ok=True)
            with self.log_path.open("ab") as out:
                self.proc = subprocess.Popen(self.command(), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            self.starts += 1

    def _supervise(self) -> None:
        """Restart the resident process whenever it exits unasked, pausing longer each time it
        dies soon after starting (1 s, 2 s, 4 s ... up to ``max_pause``)."""
        pause = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            if code == EXIT_FLOWER_MISMATCH:  # the installed Flower is not the pinned one: it will not come up
                self._note("the resident runtime does not support the installed Flower (see above); every message "
                           "runs in Flower's own flwr-clientapp process")
                return
            pause = 1.0 if time.monotonic() - started > 60 else min(self.max_pause, pause * 2)
            # a signal to the whole process group stops the site too: give it the pause to say so
            if self._stopping.wait(pause):
                return
            self._note(f"the resident runtime exited with code {code}; restarted it after {pause:.0f} s "
                       "(messages meanwhile ran in Flower's own flwr-clientapp)")
            self._spawn()

    def _note(self, line: str) -> None:
        with self.log_path.open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING umeml.site.supervisor: {line}\n")
        print(f"warning: {line}", file=sys.stderr, flush=True)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the resident process (SIGTERM, SIGKILL after ``grace``) and remove its folder."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_resident(site_id: str, site_file: Path, experiment: Path | None, log_path: Path,
                   env: dict[str, str], flower_clientapp: list[str]) -> tuple[ResidentRuntime, dict[str, str]]:
    """Start a site's resident runtime and say so; returns it and the SuperNode's environment
    (with the launcher first on PATH)."""
    runtime = ResidentRuntime(site_file, experiment, log_path, env)
    t0 = time.monotonic()
    if runtime.start(flower_clientapp):
        print(f"site {site_id}: resident runtime ready in {time.monotonic() - t0:.1f} s (pid {runtime.proc.pid}; "
              f"log {log_path})", flush=True)
    else:
        print(f"warning: site {site_id}: the resident runtime did not come up (see {log_path}); messages run in "
              "Flower's own flwr-clientapp processes until it does", file=sys.stderr, flush=True)
    return runtime, runtime.superexec_env(env)

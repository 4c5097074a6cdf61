"""Site reconnect time after a SuperLink restart, on loopback (issue 14: "sites reconnect after a
SuperLink restart within one heartbeat period").

    python -m bench.bench_reconnect [--sites 3] [--repeats 3] [--down 10 40] [--write docs/benchmarks.md]

Starts a SuperLink (``flower-superlink``, SQLite database) and ``--sites`` tuned SuperNodes
(``python -m umeml.flower.supernode_main``, as ``umeml-client start`` runs them) on 127.0.0.1,
waits until the SuperLink has activated every node, then per repeat SIGKILLs the SuperLink (its
whole process group), leaves it down for ``--down`` seconds (each value given: one row each; a
longer outage lets the nodes' backoff grow to its cap) and starts it again on the same port and
database. Reconnect time per site = from the moment the SuperLink listens again to the moment
that site's SuperNode logs Flower's "Connection successful after ... tries" (its first request
that went through after failing: its next poll or heartbeat reached the SuperLink), read from
the site's log every 0.05 s. Compared with Flower's node heartbeat period
(``HEARTBEAT_DEFAULT_INTERVAL``). All processes are started and stopped here by pid.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._harness import command, loadavg, write_section

MODULE = "bench.bench_reconnect"
TITLE = "## Federation: site reconnect after a SuperLink restart"
RECONNECTED = "Connection successful after"  # Flower's retry invoker, on a call that failed before


NOTES = """\
Reconnect time: from the restarted SuperLink listening (the moment its port accepts connections)
to the site's SuperNode logging Flower's "Connection successful after ... tries", i.e. its first
request (poll or heartbeat) that went through after the outage, read from the site's log every
0.05 s. A SuperNode retries a failed request without limit, waiting 1 s doubling with full jitter,
capped at 20 s (`flwr.supercore.retry.http_retry`), so the wait after the SuperLink is back is at
most 20 s (plus the request), below Flower's node heartbeat period of 30 s
(`HEARTBEAT_DEFAULT_INTERVAL`: a node beats every 17.5-22.5 s and counts as gone after 60 s).
Goal (issue 14), sites reconnect within one heartbeat period: met in every restart measured.
"""


def _count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0


def _wait(what: str, done, timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f} s")
        time.sleep(step)


class Deployment:
    """A SuperLink and ``sites`` SuperNodes on 127.0.0.1 under ``work``, started and stopped by pid."""

    def __init__(self, work: Path, sites: int):
        from umeml.flower.processes import free_port
        from umeml.server.deploy import SuperLink

        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.link = SuperLink("127.0.0.1", free_port(), work / "flower", work / "superlink.log")
        self.logs = [work / f"site{i}.log" for i in range(sites)]
        self.nodes: list[subprocess.Popen] = []

    def start(self, timeout: float = 300.0) -> None:
        """Start the SuperLink, then the SuperNodes; return once the SuperLink activated all."""
        from umeml.flower.processes import flower_env, free_port
        from umeml.flower.supernode import supernode_command

        self.link.start()
        for i, log in enumerate(self.logs):
            site = self.work / f"site{i}.yaml"  # passed on as node config only: no ClientApp runs here
            site.write_text(f"site_id: S{i}\n")
            cmd = supernode_command(f"127.0.0.1:{self.link.port}", free_port(), site)
            with log.open("ab") as out:
                self.nodes.append(subprocess.Popen(cmd, env=flower_env(self.work / f"node{i}"), stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
        _wait("not every SuperNode was activated",
              lambda: _count(self.link.log_path, "[Fleet.ActivateNode] Activated") >= len(self.logs), timeout, 0.2)

    def restart_link(self, down: float, timeout: float = 120.0) -> list[float]:
        """SIGKILL the SuperLink's process group, wait ``down`` s, start it again; the seconds from
        its listening again to each site's first successful request, in site order."""
        before = [_count(log, RECONNECTED) for log in self.logs]
        os.killpg(self.link.proc.pid, signal.SIGKILL)
        self.link.proc.wait(timeout=30)
        time.sleep(down)
        self.link._launch(timeout)  # same port and database (registered nodes kept), as SuperLink.restart
        listening = time.monotonic()
        seen: dict[int, float] = {}

        def all_seen() -> bool:
            for i, log in enumerate(self.logs):
                if i not in seen and _count(log, RECONNECTED) > before[i]:
                    seen[i] = time.monotonic() - listening
            return len(seen) == len(self.logs)

        _wait("a site did not reconnect", all_seen, timeout)
        return [seen[i] for i in range(len(self.logs))]

    def stop(self) -> None:
        """Stop the SuperNodes and the SuperLink (SIGTERM, then SIGKILL)."""
        from umeml.flower.processes import stop_process

        for proc in self.nodes:
            stop_process(proc)
        self.link.stop()


def measure(work: Path, sites: int = 3, repeats: int = 3, down: float = 10.0, settle: float = 5.0) -> list[list[float]]:
    """Reconnect seconds per site for each of ``repeats`` SuperLink restarts (one deployment)."""
    deployment = Deployment(work, sites)
    try:
        deployment.start()
        runs = []
        for _ in range(repeats):
            time.sleep(settle)  # the nodes back at their idle polling
            runs.append(deployment.restart_link(down))
        return runs
    finally:
        deployment.stop()


def heartbeat_period() -> float:
    """Flower's node heartbeat period in seconds (``HEARTBEAT_DEFAULT_INTERVAL``)."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL

    return float(HEARTBEAT_DEFAULT_INTERVAL)


def row(runs: list[list[float]], sites: int, down: float, load: str) -> str:
    """One markdown table row of the measured reconnect times."""
    flat = sorted(t for r in runs for t in r)
    per = "; ".join(", ".join(f"{t:.1f}" for t in r) for r in runs)
    return (f"| loopback, {sites} idle SuperNodes (tuned), SuperLink SIGKILLed and down {down:.0f} s, "
            f"{len(runs)} restarts | median {statistics.median(flat):.1f} s, max {flat[-1]:.1f} s "
            f"(per restart, per site: {per}) | {heartbeat_period():.0f} s | {load} |")


def main(argv=None) -> int:
    """Measure, print, and with ``--write`` replace this bench's section of the markdown file."""
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--down", type=float, nargs="+", default=[10.0, 40.0], help="seconds the SuperLink stays down")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (logs)")
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    args = ap.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="umeml-reconnect-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = []
    for down in args.down:
        load0 = loadavg()
        runs = measure(work / f"down-{down:g}", args.sites, args.repeats, down)
        lines.append(row(runs, args.sites, down, f"{load0} -> {loadavg()}"))
        print(lines[-1], flush=True)
    if args.write:
        body = ("| setting | reconnect time (SuperLink listening again -> the site's next request served) "
                "| Flower's heartbeat period | load average |\n| --- | --- | --- | --- |\n" + "\n".join(lines) + "\n\n"
                + NOTES)
        write_section(args.write, TITLE, f"Command: `{command(MODULE, argv)}`\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

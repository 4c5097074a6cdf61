"""The fault script (issue 14's goal), on 127.0.0.1: a site killed mid-round, the coordinator
SIGKILLed with its whole process group and resumed, the SuperLink killed and restarted. The run
completes with no completed round lost or repeated, the held-out site never trains and
metrics.csv has no duplicate row. Timings are printed (``pytest -s``) for docs and reports."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL

from umeml.data.synth import SynthSpec
from umeml.flower.processes import free_port, processes_with_env, stop_process

from fed_helpers import spawn_logged, stage_sites

BIN = Path(sys.executable).parent
RECONNECTED = "Connection successful after"  # Flower's retry invoker, on a call that had failed
ROUNDS = 4
# no split.test_sites: the held-out site comes from --held-out, which the resume leaves out
EXPERIMENT = f"""\
tasks: [grade, survival]
data: {{max_patches: 16}}
model: {{hidden_dim: 16, n_prototypes: 2, n_registers: 1}}
train: {{batch_size: 8, lr: 0.003, bootstrap: 0}}
federation: {{rounds: {ROUNDS}, local_epochs: 1, min_train_sites: 1, k_min_patients: 5, round_timeout_s: 300}}
"""


def _wait_for(path: Path, text: str, timeout: float, proc=None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and text in path.read_text(errors="replace"):
            return time.monotonic() - t0
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {text!r} appeared in {path}")
        time.sleep(0.25)
    raise AssertionError(f"no {text!r} in {path} after {timeout:.0f} s")


def _reconnects(log: Path) -> int:
    """How often the site's SuperNode got through to the SuperLink after failing (Flower's retry)."""
    return log.read_text(errors="replace").count(RECONNECTED) if log.exists() else 0


def _reconnect_times(superlink_log: Path, site_logs: dict, before: dict, coord, timeout: float = 600) -> dict:
    """Per site, seconds from the restarted SuperLink listening (its log's "Uvicorn running on"
    line, UTC) to the site's SuperNode logging a reconnect (seen by polling its log every 0.1 s)."""
    starts = _listening(superlink_log)
    t0, seen = time.monotonic(), {}
    while time.monotonic() - t0 < timeout and len(seen) < len(site_logs) and coord.poll() is None:
        for site, log in site_logs.items():
            if site not in seen and _reconnects(log) > before[site]:
                seen[site] = time.time()
        time.sleep(0.1)
    restarted = [t for t in _listening(superlink_log) if t not in starts]
    assert restarted, f"the SuperLink was not started again ({superlink_log})"
    return {site: t - restarted[0] for site, t in seen.items()}


def _listening(superlink_log: Path) -> list[float]:
    """Times (epoch seconds) at which the SuperLink logged that it listens."""
    from datetime import datetime

    found = []
    for line in superlink_log.read_text(errors="replace").splitlines():
        if "Uvicorn running on" in line:
            found.append(datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp())
    return found


def _site(d: Path, s: str, port: int, tag: str):
    return spawn_logged([str(BIN / "umeml-client"), "start", "--site", f"{s}.yaml", "--server", f"127.0.0.1:{port}",
                         "--port", str(free_port())], d / f"{s}-{tag}.log", d)


def _coordinator(d: Path, port: int, *extra: str, tag: str):
    return spawn_logged([str(BIN / "umeml-server"), "start", "--sites", "3", "--port", str(port), "--wait-timeout",
                         "400", "--no-report", *extra], d / f"server-{tag}.log", d)


@pytest.fixture
def staged(tmp_path):
    spec = SynthSpec(sites=3, patients=12, seed=2, feature_dim=8, median_patches=12, min_patches=4, max_patches=24)
    stage_sites(tmp_path, spec, EXPERIMENT)
    return tmp_path


def _kill_group(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow  # SuperLink, three SuperNodes, two coordinators: minutes
@pytest.mark.timeout(2400)
def test_faults_site_coordinator_and_superlink_killed_run_completes(staged):
    d, port = staged, free_port()
    run, progress, times = d / "run", d / "run" / "progress.log", {}
    home = str((run / "flower").resolve())
    procs = {}
    try:
        procs["coord"] = _coordinator(d, port, "--config", "exp.yaml", "--out", "run", "--held-out", "A2", tag="1")
        time.sleep(2)
        for s in ("A0", "A1", "A2"):
            procs[s] = _site(d, s, port, "1")
        times["to_round_1"] = _wait_for(progress, f"round 1/{ROUNDS}", 600, procs["coord"])
        # 1. a site killed mid-round (round 2 is under way), started again a little later
        _kill_group(procs["A1"])
        time.sleep(5)
        procs["A1"] = _site(d, "A1", port, "2")
        times["round_2_with_a_dead_site"] = _wait_for(progress, f"round 2/{ROUNDS}", 600, procs["coord"])
        # 2. the coordinator SIGKILLed with its whole process group: the watchdog stops its Flower processes
        _kill_group(procs["coord"])
        t0 = time.monotonic()
        while processes_with_env("FLWR_HOME", home) and time.monotonic() - t0 < 20:
            time.sleep(0.2)
        times["orphans_gone_after_coordinator_kill"] = time.monotonic() - t0
        assert processes_with_env("FLWR_HOME", home) == [], "Flower processes outlived the coordinator"
        procs["coord"] = _coordinator(d, port, "--resume", "run", tag="2")  # no --held-out: the recorded one holds
        times["resume_to_round_3"] = _wait_for(progress, f"round 3/{ROUNDS}", 900, procs["coord"])
        # 3. the SuperLink killed: the coordinator starts it again, the sites reconnect, the run resumes
        superlink = json.loads((run / "coordinator.lock").read_text())["superlink_pid"]
        site_logs = {"A0": d / "A0-1.log", "A1": d / "A1-2.log", "A2": d / "A2-1.log"}
        before = {s: _reconnects(p) for s, p in site_logs.items()}
        os.kill(superlink, signal.SIGKILL)
        t0 = time.monotonic()
        reconnect = _reconnect_times(run / "superlink.log", site_logs, before, procs["coord"])
        rc = procs["coord"].wait(timeout=1200)
        times["superlink_restart_to_end"] = time.monotonic() - t0
        log = (d / "server-2.log").read_text()
        assert rc == 0, log + (run / "superlink.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            stop_process(p, grace=10)
    assert "starting it again and resuming" in log
    _check_resident_served_every_run(d / "state" / "A0" / "resident.log")
    print("\nfault script timings (s):", json.dumps({k: round(v, 1) for k, v in times.items()}))
    print("reconnect after the SuperLink restart (s, SuperLink listening -> the site's next request served):",
          json.dumps({k: round(v, 1) for k, v in reconnect.items()}), "load", Path("/proc/loadavg").read_text()[:14])
    # issue 14: sites reconnect after a SuperLink restart within one heartbeat period
    assert set(reconnect) == set(site_logs) and max(reconnect.values()) < HEARTBEAT_DEFAULT_INTERVAL, reconnect
    _check_outcome(run)


def _check_resident_served_every_run(log_path: Path) -> None:
    """A0's site was never stopped: its one resident process served the messages of the first
    run, of the resume after the coordinator's kill and of the resume after the SuperLink's
    restart (issue 14: "serves every message ... and of later runs with the same data")."""
    log = log_path.read_text(errors="replace")
    runs = {int(m) for m in re.findall(r"served \S+ \(run (\d+)\) in .*: completed", log)}
    assert len(runs) >= 3 and log.count("resident runtime ready") == 1, log[-3000:]


def _check_outcome(run: Path) -> None:
    final = json.loads((run / "final.json").read_text())
    assert final["rounds"] == ROUNDS and final["held_out_sites"] == ["A2"]
    # every round completed once: none lost, none repeated after a kill
    lines = [ln for ln in (run / "progress.log").read_text().splitlines() if ln.startswith("round ")]
    assert [int(ln.split()[1].split("/")[0]) for ln in lines] == list(range(1, ROUNDS + 1)), lines
    history = torch.load(run / "resume.pt", weights_only=True)["history"]
    assert [e["round"] for e in history] == list(range(1, ROUNDS + 1))
    trained = {r["site"] for e in history for r in e["train"]}
    assert "A2" not in trained and trained <= {"A0", "A1"}
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    keys = Counter((r["unit"], r["step"], r["kind"], r["site"], r["task"], r["metric"]) for r in rows)
    assert [k for k, n in keys.items() if n > 1] == []
    assert not [r for r in rows if r["kind"] == "train" and r["site"] == "A2"]
    # the held-out site is evaluated (on a busy machine a reply may miss a round's timeout: not every round)
    assert ROUNDS in {int(r["step"]) for r in rows if r["kind"] == "held_out" and r["site"] == "A2"}
    print("fault script: rounds", [e["round"] for e in history], "accepted", [e["accepted"] for e in history],
          "metrics rows", len(rows), "duplicates 0, A2 train rows 0")

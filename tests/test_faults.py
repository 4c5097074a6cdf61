"""The fault script (issue 14's goal), on 127.0.0.1: a site killed mid-round, the coordinator
SIGKILLed with its whole process group and resumed, the SuperLink killed and restarted. The run
completes with no completed round lost or repeated, the held-out site never trains and
metrics.csv has no duplicate row. Timings are printed (``pytest -s``) for docs and reports."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from umeml.data.synth import SynthSpec
from umeml.flower.processes import free_port, processes_with_env, stop_process

from fed_helpers import spawn_logged, stage_sites

BIN = Path(sys.executable).parent
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
        os.kill(superlink, signal.SIGKILL)
        t0 = time.monotonic()
        rc = procs["coord"].wait(timeout=1200)
        times["superlink_restart_to_end"] = time.monotonic() - t0
        log = (d / "server-2.log").read_text()
        assert rc == 0, log + (run / "superlink.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            stop_process(p, grace=10)
    assert "starting it again and resuming" in log
    print("\nfault script timings (s):", json.dumps({k: round(v, 1) for k, v in times.items()}))
    _check_outcome(run)


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

"""A real deployment on 127.0.0.1: `umeml-server start` (SuperLink + flwr run) and three
`umeml-client start` (SuperNodes) as subprocesses; everything is stopped at the end, even on failure."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from umeml.data.synth import SynthSpec
from umeml.flower.processes import free_port, stop_process

from fed_helpers import spawn_logged, stage_sites

BIN = Path(sys.executable).parent
EXPERIMENT = """\
tasks: [grade, subtype, survival]
split: {test_sites: [A2]}
data: {max_patches: 32}
model: {hidden_dim: 16, n_prototypes: 3, n_registers: 2}
train: {batch_size: 8, lr: 0.003, bootstrap: 20}
federation: {rounds: 2, local_epochs: 1, min_train_sites: 1, k_min_patients: 5}
"""


@pytest.fixture
def sites(tmp_path):
    spec = SynthSpec(sites=3, patients=14, seed=1, feature_dim=16, median_patches=30, min_patches=4, max_patches=80)
    ids = stage_sites(tmp_path, spec, EXPERIMENT)
    return tmp_path, ids


@pytest.mark.slow  # SuperLink + three SuperNodes
@pytest.mark.timeout(900)
def test_superlink_and_three_supernodes_complete_two_rounds(sites):
    d, ids = sites
    port = free_port()
    procs = []
    try:
        server = spawn_logged([str(BIN / "umeml-server"), "start", "--config", "exp.yaml", "--sites", "3", "--out", "run",
                         "--port", str(port), "--wait-timeout", "300"], d / "server.log", d)
        procs.append(server)
        time.sleep(2)
        for s in ids:
            procs.append(spawn_logged([str(BIN / "umeml-client"), "start", "--site", f"{s}.yaml", "--server",
                                 f"127.0.0.1:{port}", "--port", str(free_port())], d / f"{s}.log", d))
        killed = _kill_resident_after(d / "state" / "A0" / "resident.log", "served query.preprocess", server)
        rc = server.wait(timeout=840)
        out = (d / "server.log").read_text()
        assert rc == 0, out + "\n" + (d / "run" / "superlink.log").read_text()[-3000:]
    finally:
        for p in procs:
            stop_process(p, grace=15)
    final = json.loads((d / "run" / "final.json").read_text())
    assert final["rounds"] == 2 and final["held_out_sites"] == ["A2"]
    assert final["held_out"]["A2"]["n"] == 14
    assert "held-out metrics after 2 rounds" in out and "A2" in out
    rows = (d / "run" / "metrics.csv").read_text().splitlines()
    for rnd in (1, 2):
        assert any(r.startswith(f"round,{rnd},held_out,A2,14,grade,auc_macro,") for r in rows), rnd
    assert all(p.poll() is not None for p in procs)
    # the coordinator's report: no per-patient predictions reach it, so no ROC / Kaplan-Meier
    plots = {p.name for p in (d / "run" / "plots").glob("*.png")}
    assert {"curves.png", "forest_grade.png", "confusion_grade.png"} <= plots
    assert not any(p.startswith(("roc_", "kaplan")) for p in plots) and not (d / "run" / "predictions.npz").exists()

    _check_resident_runtime(d, killed)


def _resident_log(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _kill_resident_after(log: Path, marker: str, server, timeout: float = 600) -> int:
    """SIGKILL a site's resident process once its log shows ``marker``; returns its pid."""
    deadline = time.monotonic() + timeout
    while marker not in _resident_log(log):
        assert server.poll() is None and time.monotonic() < deadline, _resident_log(log)[-2000:]
        time.sleep(0.2)
    pid = int(re.search(r"resident runtime ready \(pid (\d+)", _resident_log(log)).group(1))
    os.kill(pid, signal.SIGKILL)
    return pid


def _check_resident_runtime(d: Path, killed: int) -> None:
    """Every message of A1 and A2 was served by one resident process loaded once; A0's resident,
    killed after the preprocessing query, was restarted and served the rest of the run."""
    for site, n_messages in (("A1", 5), ("A2", 3)):  # trainers: handshake, preprocess, 2 train, final evaluate
        log = _resident_log(d / "state" / site / "resident.log")
        served = re.findall(r"served (\S+) .*: (\w+) \(pid (\d+)\)", log)
        assert len(served) == n_messages and {s[1] for s in served} == {"completed"}, log[-3000:]
        assert len({s[2] for s in served}) == 1 and log.count("resident runtime ready") == 1
        assert "Flower's own flwr-clientapp" not in (d / f"{site}.log").read_text()
    log = _resident_log(d / "state" / "A0" / "resident.log")
    assert "exited with code -9; restarted" in log and log.count("resident runtime ready") == 2
    pids = set(re.findall(r"\(pid (\d+)\)", log))
    assert str(killed) in pids and len(pids) == 2
    # The restarted process serves the messages that arrive once it is ready; those that came while
    # it restarted ran in Flower's own flwr-clientapp (rounds take about a second now, so which
    # messages those are depends on the machine): at least the final evaluation is served by it.
    after = log.split("restarted", 1)[1]
    restarted_pid = (pids - {str(killed)}).pop()
    assert re.search(rf"served \S+ .*: completed \(pid {restarted_pid}\)", after), after[-3000:]

"""A real deployment on 127.0.0.1: `umeml-server start` (SuperLink + flwr run) and three
`umeml-client start` (SuperNodes) as subprocesses; everything is stopped at the end, even on failure."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from umeml.data.synth import SynthSpec, generate, split_by_site
from umeml.flower.processes import free_port, stop_process

from fed_helpers import spawn_logged

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
    generate(SynthSpec(sites=3, patients=14, seed=1, feature_dim=16, median_patches=30, min_patches=4, max_patches=80),
             tmp_path / "all")
    ids = split_by_site(tmp_path / "all", tmp_path / "sites")
    for s in ids:
        (tmp_path / f"{s}.yaml").write_text(
            f"site_id: {s}\ndata_dir: sites/{s}\ndevice: cpu\nk_min_patients: 5\nstate_dir: state/{s}\n")
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
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

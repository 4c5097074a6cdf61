"""`umeml-server simulate` beyond one process: a Ray cluster started by the test on 127.0.0.1,
per-site resources, and SIGTERM stopping a simulation (its Ray included) within 10 s."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from umeml.config import config_from_dict, dump_config
from umeml.flower.processes import free_port, wait_for_port
from umeml.server.cli import main

from fed_helpers import tiny_experiment

BIN = Path(sys.executable).parent
EXPERIMENT = dump_config(tiny_experiment(bootstrap=0, split={"test_sites": ["A2"]}))


def test_backend_config_joins_a_cluster_with_per_site_resources():
    from umeml.simulation import backend_config

    local = backend_config(config_from_dict({}), 3)
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert local["init_args"]["num_cpus"] >= 1 and "address" not in local["init_args"]
    cfg = config_from_dict({"simulation": {"ray_address": "10.0.0.5:6379", "cpus_per_site": 4, "gpus_per_site": 0.25}})
    joined = backend_config(cfg, 35)
    assert joined["client_resources"] == {"num_cpus": 4.0, "num_gpus": 0.25}
    # Ray refuses num_cpus/num_gpus when it joins a cluster: the cluster's machines bring theirs
    assert joined["init_args"]["address"] == "10.0.0.5:6379" and "num_cpus" not in joined["init_args"]


def test_placement_flags_are_checked(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    rc = main(["simulate", "--config", str(tmp_path / "exp.yaml"), "--gpus-per-site", "0.5", "--cpus-per-site", "0",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "--cpus-per-site 0: must be > 0" in err and "with --device cpu" in err


@pytest.fixture
def ray_head():
    """`ray start --head --block` on 127.0.0.1 in a process group of its own, stopped by that
    group (never `ray stop`, which would stop every Ray of this user on the machine)."""
    temp = tempfile.mkdtemp(prefix="ry", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                             "--disable-usage-stats", "--temp-dir", temp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 120, proc)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_group(proc.pid)
        proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(pgid: int, grace: float = 15.0) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_members(pgid):
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow  # a Ray cluster + Flower's simulation engine
@pytest.mark.timeout(600)
def test_simulation_joins_an_existing_ray_cluster(ray_head, tiny_cohort_dir, tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    out = tmp_path / "run"
    try:
        rc = main(["simulate", "--config", str(tmp_path / "exp.yaml"), "--data", str(tiny_cohort_dir), "--out", str(out),
                   "--rounds", "1", "--ray-address", ray_head, "--cpus-per-site", "1", "--no-report"])
    finally:
        import ray

        ray.shutdown()
    assert rc == 0, capsys.readouterr().err
    final = json.loads((out / "final.json").read_text())
    assert final["rounds"] == 1 and final["held_out_sites"] == ["A2"]
    saved = (out / "config.yaml").read_text()
    assert f"ray_address: {ray_head}" in saved or f"ray_address: '{ray_head}'" in saved


def _ray_group(supervisor: int) -> int | None:
    """The process group of the supervisor's child (the simulation) once a Ray daemon runs in it."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == supervisor:
                group = int(fields[3])
                names = [Path(f"/proc/{p}/comm").read_text().strip() for p in _group_members(group)]
                if any(n.startswith(("gcs_server", "raylet")) for n in names):
                    return group
        except (OSError, IndexError, ValueError):
            continue
    return None


def _rounds_done(run: Path) -> int:
    """The last round with a row in the run's metrics.csv (long format), 0 before the first."""
    try:
        lines = (run / "metrics.csv").read_text().splitlines()[1:]
    except OSError:
        return 0
    cells = [line.split(",", 2) for line in lines]  # unit,step,...
    return max((int(c[1]) for c in cells if c[0] == "round" and c[1].isdigit()), default=0)


@pytest.mark.slow  # Ray start-up
@pytest.mark.timeout(420)
@pytest.mark.parametrize("phase", ["while Ray starts", "mid-run"])
def test_sigterm_stops_a_simulation_within_10_s(tiny_cohort_dir, tmp_path, phase):
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    run = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "umeml-server"), "simulate", "--config", str(tmp_path / "exp.yaml"),
                             "--data", str(tiny_cohort_dir), "--out", str(run), "--rounds", "2000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    group = None
    try:
        deadline = time.monotonic() + 240
        while (group := _ray_group(proc.pid)) is None and time.monotonic() < deadline:
            assert proc.poll() is None, "the simulation ended before Ray started"
            time.sleep(0.1)
        assert group is not None, "Ray did not start within 240 s"
        while phase == "mid-run" and _rounds_done(run) < 1 and time.monotonic() < deadline + 120:
            assert proc.poll() is None, "the simulation ended before its first round"
            time.sleep(0.1)
        if phase == "mid-run":  # the signal lands while rounds run: sites are training in Ray's workers
            assert 1 <= _rounds_done(run) < 2000, _rounds_done(run)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
    finally:
        _stop_group(proc.pid, grace=1)
        if group is not None:
            _stop_group(group, grace=1)
    assert rc == 143 and took < 10, (rc, took)
    assert _group_members(group) == []  # the simulation and Ray's daemons are gone

"""``umeml-server simulate``: a federation on one machine with Flower's simulation engine.

One virtual SuperNode per site of the cohort; the ServerApp is the same coordinator that runs
a real deployment. Without ``--data`` the synthetic demo cohort is generated first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from umeml.config import ExperimentConfig, config_to_dict
from umeml.data.cohort import Cohort
from umeml.data.source import CohortSource
from umeml.data.splits import choose_test_sites
from umeml.rundir import RunDir, read_final


def plan_sites(cfg: ExperimentConfig, cohort: Cohort, held_out: tuple[str, ...] | None = None) -> tuple[list[str], tuple[str, ...]]:
    """Sites that take part (training + held out) and the held-out ones, by config and seed."""
    held = tuple(held_out) if held_out else (tuple(cfg.split.test_sites) or choose_test_sites(cohort, cfg.split.n_test_sites, cfg.seed))
    unknown = sorted(set(held) - set(cohort.sites))
    if unknown:
        raise ValueError(f"held-out site(s) {unknown} are not in the cohort (sites: {', '.join(cohort.sites)})")
    train = list(cfg.federation.train_sites) or [s for s in cohort.sites if s not in held]
    unknown = sorted(set(train) - set(cohort.sites))
    if unknown:
        raise ValueError(f"federation.train_sites {unknown} are not in the cohort")
    return sorted(set(train) | set(held)), tuple(sorted(held))


def simulate(cfg: ExperimentConfig, cohort: Cohort, source: CohortSource, run_dir: str | Path,
             held_out: tuple[str, ...] | None = None, resume: bool = False, device: str = "cpu") -> dict:
    """Run the federation in Flower's simulation engine and return final.json's content.

    ``source`` names ``cohort`` for the virtual sites and the pooled metrics (its paths are made
    absolute, so they do not depend on the folder a worker runs in).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from umeml.client.app import SimulatedSites, build_client_app
    from umeml.server.app import build_server_app

    sites, held = plan_sites(cfg, cohort, held_out)
    source = source.resolved()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "experiment": json.dumps(config_to_dict(cfg)),
        "run-dir": str(run_dir),
        "resume": int(resume),
        "expected-sites": len(sites),
        "held-out": ",".join(held),
        "wait-timeout": 120,
        **source.settings(),
    }
    client = build_client_app(SimulatedSites(tuple(sites), source, device, state_root=str(RunDir(run_dir.resolve()).sites)))
    run_simulation(
        server_app=build_server_app(settings),
        client_app=client,
        num_supernodes=len(sites),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": max(1, min(len(sites), os.cpu_count() or 1)), "logging_level": "ERROR",
                          "log_to_driver": True},
        },
    )
    final_path = RunDir(run_dir).final
    if not final_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {final_path}; see the log above")
    return read_final(final_path).to_json()

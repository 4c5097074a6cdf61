"""A federation on one machine with Flower's simulation engine (installed as ``umeml.simulation``).

One virtual SuperNode per site of the cohort; the ServerApp is the same coordinator that runs
a real deployment, the ClientApp the same one a hospital site runs. ``umeml-server simulate``
(and its ``--compare`` mode, :mod:`umeml.simulation.compare`) calls into this package.

Why a package of its own: a simulation is the one place that needs both sides at once (it
builds the coordinator's ServerApp and the sites' ClientApp in one process). ``umeml.server``
must not import ``umeml.client`` nor the reverse, and ``umeml.flower`` (the adapter both share)
imports neither; a lazy import of both inside ``umeml.flower`` would be a hidden exception to
that rule. Here the exception is the whole point of the package and visible in the layout:
this is the only package that imports both sides, and only ``umeml-server``'s command line
(``server/cli.py``, inside the ``simulate`` command) reaches it, so importing any
``umeml.server`` module never loads ``umeml.client`` (``tests/test_layering.py`` checks both).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from umeml.config import ExperimentConfig, config_to_dict
from umeml.data.cohort import Cohort
from umeml.data.source import CohortSource
from umeml.logs import console_level, run_logging
from umeml.rundir import RunDir, read_final
from umeml.server.simulate import plan_sites

__all__ = ["simulate"]


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
    # Ray's own logger prints through its own handler: ERROR unless the console asks for more (--verbose)
    ray_level = "ERROR" if console_level() >= logging.WARNING else logging.getLevelName(console_level())
    # run_simulation stays (its deprecation notice goes to the log file only): umeml.logs says why
    with run_logging(RunDir(run_dir).log):
        run_simulation(
            server_app=build_server_app(settings),
            client_app=client,
            num_supernodes=len(sites),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": max(1, min(len(sites), os.cpu_count() or 1)), "logging_level": ray_level,
                              "log_to_driver": True},
            },
        )
    final_path = RunDir(run_dir).final
    if not final_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {final_path}; see the errors above and "
                           f"{RunDir(run_dir).log} (every log line of the run)")
    return read_final(final_path).to_json()

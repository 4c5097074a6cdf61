"""The Flower ServerApp: reads its settings and hands the Grid to the :class:`Coordinator`.

Settings (run-config keys when deployed with ``flwr run``; passed directly in simulation):
``experiment`` (the experiment config as JSON), ``run-dir``, ``resume`` (0/1),
``expected-sites``, ``held-out`` (comma-separated site ids), ``wait-timeout`` (s), and in
simulation ``sim-data-dir`` / ``sim-table`` / ``sim-signatures`` / ``sim-bags`` naming the cohort,
so that pooled metrics over all held-out patients are computed too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from umeml.config import config_from_dict
from umeml.flower.pulls import fast_object_pulls
from umeml.flower.supernode_main import retry_internal_errors
from umeml.lazy import import_now
from umeml.server.coordinator import Coordinator
from umeml.server.grid import FastPollGrid, PackingGrid
from umeml.server.pooled import pooled_evaluator
from umeml.server.retry import RetryingGrid

# Flower 1.42's ServerApp reaches the SuperLink over HTTP with a retry that gives up on 500
# ("database is locked"), also in its task heartbeat; retried here as in the SuperNode shim
retry_internal_errors()
# replies are pulled as soon as a site's upload finishes, not after Flower's 1 s + 2 s + ... backoff
# (umeml/flower/pulls.py); with another Flower the backoff stays Flower's
SLOW_PULLS = fast_object_pulls()


def run_coordinator(grid: Grid, settings: Mapping) -> dict:
    """Build the coordinator from ``settings`` and run it on ``grid``."""
    cfg = config_from_dict(json.loads(str(settings["experiment"])), "run config")
    held = tuple(s for s in str(settings.get("held-out", "")).split(",") if s)
    coordinator = Coordinator(
        cfg,
        str(settings["run-dir"]),
        expected_sites=int(settings.get("expected-sites", 1)),
        held_out=held,
        resume=bool(int(settings.get("resume", 0))),
        pooled_eval=pooled_evaluator(settings, cfg, held),
        wait_timeout=float(settings.get("wait-timeout", 300)),
    )
    return coordinator.run(grid)


def build_server_app(settings: Mapping | None = None) -> ServerApp:
    """A ServerApp using ``settings`` when given (simulation), else the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        import_now()  # while the sites connect, not after round 1 (the privacy ledger's opacus: ~4 s)
        if SLOW_PULLS:
            logging.getLogger("umeml.server").warning("replies are pulled with Flower's backoff: %s", "; ".join(SLOW_PULLS))
        run_coordinator(PackingGrid(FastPollGrid(RetryingGrid(grid))), settings if settings is not None else context.run_config)

    return app


app = build_server_app()

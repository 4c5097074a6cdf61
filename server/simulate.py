"""What ``umeml-server simulate`` runs on: where the cohort lives and which sites take part.

The simulation itself, which wires the ServerApp and the sites' ClientApp together, is
:func:`umeml.simulation.simulate` (the coordinator's package never imports the sites').
Without ``--data`` the synthetic demo cohort is generated first.
"""

from __future__ import annotations

from umeml.config import ExperimentConfig
from umeml.data.cohort import Cohort
from umeml.data.splits import choose_test_sites


def plan_sites(cfg: ExperimentConfig, cohort: Cohort,
               held_out: tuple[str, ...] | None = None) -> tuple[list[str], tuple[str, ...]]:
    """Sites that take part (training + held out) and the held-out ones, by config and seed."""
    held = tuple(held_out) if held_out else (
        tuple(cfg.split.test_sites) or choose_test_sites(cohort, cfg.split.n_test_sites, cfg.seed))
    unknown = sorted(set(held) - set(cohort.sites))
    if unknown:
        raise ValueError(f"held-out site(s) {unknown} are not in the cohort (sites: {', '.join(cohort.sites)})")
    train = list(cfg.federation.train_sites) or [s for s in cohort.sites if s not in held]
    unknown = sorted(set(train) - set(cohort.sites))
    if unknown:
        raise ValueError(f"federation.train_sites {unknown} are not in the cohort")
    return sorted(set(train) | set(held)), tuple(sorted(held))

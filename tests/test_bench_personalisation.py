"""bench/bench_personalisation.py: the personalisation wave replayed on a finished federation
reproduces the run's own wave exactly, and another variant (unguarded) is compared to it."""

from __future__ import annotations

from bench import bench_personalisation
from umeml.client.app import SimulatedSites, build_client_app
from umeml.data.source import CohortSource
from umeml.server.coordinator import Coordinator

from fed_helpers import LocalGrid, tiny_experiment

SITES = ("A0", "A1", "A2")


def test_the_replayed_wave_reproduces_the_run_and_compares_variants(tiny_cohort_dir, tmp_path, one_torch_thread):
    run_dir = tmp_path / "fold0" / bench_personalisation.RUN
    cfg = tiny_experiment(rounds=2, k_min_patients=3, split={"val_fraction": 0.25}, personalise_epochs=2,
                          personalisation={"inner_fraction": 0.4, "min_inner_patients": 3, "min_inner_events": 1})
    source = CohortSource(data_dir=str(tiny_cohort_dir))
    grid = LocalGrid(build_client_app(SimulatedSites(SITES, source, state_root=str(run_dir / "sites"))), len(SITES))
    Coordinator(cfg, run_dir, expected_sites=3, held_out=("A2",), wait_timeout=5, printer=lambda s: None).run(grid)
    variants = {"unguarded": {"guard": False}, "as run": {}}
    rec = bench_personalisation.replay(run_dir, lambda data: source.load(data), variants)
    assert rec["reproduces_the_run"] == ["as run"]
    assert rec["variants"]["as run"]["guarded"] and not rec["variants"]["unguarded"]["guarded"]
    text = bench_personalisation.tables({0: rec})
    assert "| 0 | as run | 2 (" in text and "- as run: " in text and "minus unguarded" in text
    assert "fold 0: as run" in text

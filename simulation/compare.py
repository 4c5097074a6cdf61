"""Comparison mode: centralized vs federated vs local-only on the same held-out sites.

This is how a consortium judges what federation buys: the centralized model is the ceiling
(pooling data nobody may pool), local-only is what each hospital gets alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umeml.config import ExperimentConfig
from umeml.data.cohort import Cohort
from umeml.data.source import CohortSource
from umeml.data.splits import Split, stratified_train_val
from umeml.rundir import PRIMARY_METRICS, RunDir, atomic_write_json, format_metric, metric_entry, metrics_of_tasks
from umeml.server.simulate import plan_sites
from umeml.simulation import simulate
from umeml.train.central import train_central


def _split_for(cohort: Cohort, train_sites: list[str], held: tuple[str, ...], cfg: ExperimentConfig) -> Split:
    pool = np.concatenate([cohort.site_indices(s) for s in train_sites])
    test = np.concatenate([cohort.site_indices(s) for s in held])
    train, val = stratified_train_val(cohort, pool, cfg.split.val_fraction, cfg.seed)
    split = Split(train, val, test, held)
    split.check_disjoint()
    return split


def compare(cfg: ExperimentConfig, cohort: Cohort, source: CohortSource, out: str | Path, device: str = "cpu") -> dict:
    """Run the three modes on one split; write ``comparison.json`` and return it."""
    out = Path(out)
    sites, held = plan_sites(cfg, cohort)
    train_sites = [s for s in sites if s not in held]
    results: dict[str, dict] = {}
    central = train_central(cfg, cohort, out / "centralized", _split_for(cohort, train_sites, held, cfg), progress=False)
    results["centralized"] = {"test": central["test"], "n": central["n_test"]}
    fed = simulate(cfg, cohort, source, out / "federated", held_out=held, device=device)
    results["federated"] = {"test": fed["pooled"] or fed["held_out_combined"], "n": central["n_test"]}
    for site in train_sites:
        local = train_central(cfg, cohort, out / f"local-{site}", _split_for(cohort, [site], held, cfg), progress=False)
        results[f"local-only {site}"] = {"test": local["test"], "n": local["n_test"]}
    summary = {"held_out_sites": list(held), "training_sites": train_sites, "results": results}
    atomic_write_json(RunDir(out).comparison, summary)
    return summary


def format_comparison(summary: dict) -> str:
    """Modes side by side: primary metric per task with its 95% CI."""
    columns = metrics_of_tasks([res["test"] for res in summary["results"].values()], PRIMARY_METRICS)
    header = ["mode", "n"] + [f"{t} {k}" for t, k in columns]
    rows = []
    for mode, res in summary["results"].items():
        rows.append([mode, str(res["n"])] + [format_metric(metric_entry(res["test"], t, k), ci_digits=2)
                                             for t, k in columns])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return f"held-out sites: {', '.join(summary['held_out_sites'])}\n" + "\n".join(lines)

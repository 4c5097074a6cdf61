"""Sensitivity of UMEML to the number of prototypes K and to the gene grouping (paper's open question 2).

    python -m bench.bench_sensitivity [--k 2 5 10 20] [--seeds 0 1] [--gbm-seeds 0 1]
                                      [--full-grid] [--skip-synth] [--skip-gbmlgg] [--write docs/benchmarks.md]

One factor at a time (default): ``model.n_prototypes`` in ``--k`` with the 6 signature gene groups,
and ``data.genomics_mode: flat`` (all genomic columns as one group) at K = ``--base-k`` (5);
``--full-grid`` crosses every K with both groupings. Centralized UMEML, test metrics on held-out sites.

- **Synthetic cohort** (``umeml synth``, 4 sites x 60 patients per seed, configs/demo.yaml, one
  held-out site chosen by the seed; seeds 0-2 are the cohorts of bench_synthetic.py).
- **TCGA GBM-LGG, genomics only** (configs/gbmlgg_genomics.yaml: 8 training sites, E1 + CS held
  out, 37 patients). The model has no pathology branch there, and the K prototypes belong to the
  pathology branch only (they cross-attend to patches and define S^p of the modularity loss).
  The script checks this instead of assuming it: it builds the genomics-only model for every K
  and verifies that the parameters are identical (same names, shapes and values under the same
  seed); when they are, K cannot change any result and only the gene grouping is trained, over
  ``--gbm-seeds`` (the seed moves the validation split and the initialisation, not the test sites).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._harness import PRIMARY, REPO, TCGA, command, pick, write_section

MODULE = "bench.bench_sensitivity"
TITLE = "## Sensitivity: prototypes K and gene grouping"
METRICS = PRIMARY
MODES = ("signatures", "flat")


def _cfg(base, seed: int, k: int, mode: str):
    return dataclasses.replace(base, seed=seed, data=dataclasses.replace(base.data, genomics_mode=mode),
                               model=dataclasses.replace(base.model, n_prototypes=k))


def _grid(ks, base_k: int, full: bool) -> list[tuple[int, str]]:
    if full:
        return [(k, m) for m in MODES for k in ks]
    return [(k, "signatures") for k in ks] + [(base_k, "flat")]


def _train(base, seed: int, k: int, mode: str, cohort, out: Path, log, what: str) -> dict:
    """Train one (K, grouping, seed) cell centrally; log and return its test metrics."""
    from umeml.train.central import train_central

    t0 = time.perf_counter()
    metrics = pick(train_central(_cfg(base, seed, k, mode), cohort, out, progress=False)["test"], METRICS)
    log(what + " " + "  ".join(f"{t} {v:.3f}" for t, v in metrics.items() if v is not None)
        + f"  ({time.perf_counter() - t0:.0f} s)")
    return metrics


def synthetic(ks, seeds, tmp: Path, log=print, base_k: int = 5, full: bool = False) -> dict:
    """{(k, mode): {seed: metrics}} on synthetic cohorts."""
    from umeml.config import load_config
    from umeml.data.cohort import load_data_dir
    from umeml.data.synth import SynthSpec, generate

    base = load_config(REPO / "configs" / "demo.yaml")
    grid = _grid(ks, base_k, full)
    out: dict = {cell: {} for cell in grid}
    for seed in seeds:
        data = tmp / f"synth{seed}"
        generate(SynthSpec(sites=4, patients=60, seed=seed), data)
        for mode in MODES:
            cohort = load_data_dir(data, dataclasses.replace(base.data, genomics_mode=mode))
            for k in [k for k, m in grid if m == mode]:
                out[(k, mode)][seed] = _train(base, seed, k, mode, cohort, tmp / f"s{seed}-{mode}-{k}", log,
                                              f"synthetic seed {seed} K={k:<2d} {mode:10s} "
                                              f"groups={len(cohort.gene_groups.sizes)}")
    return out


def k_unused_genomics_only(base, ks, group_sizes, heads) -> tuple[bool, int]:
    """True when the genomics-only UMEML is the same model (names, shapes, values) for every K."""
    import torch

    from umeml.model import build_model

    states = []
    for k in ks:
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(base.model, n_prototypes=k), 1, group_sizes, heads)
        states.append(model.state_dict())
    ref = states[0]
    same = all(s.keys() == ref.keys() and all(torch.equal(s[n], ref[n]) for n in ref) for s in states[1:])
    return same, sum(v.numel() for v in ref.values())


def gbmlgg(ks, seeds, tmp: Path, log=print, base_k: int = 5, full: bool = False) -> tuple[dict, dict]:
    """{(k, mode): {seed: metrics}} on GBM-LGG genomics, and facts about the K check."""
    from umeml.config import load_config
    from umeml.data.cohort import load_cohort
    from umeml.data.splits import make_split
    from umeml.train.central import prepare

    base = load_config(REPO / "configs" / "gbmlgg_genomics.yaml")
    table, sig = TCGA / "tcga_gbmlgg_all_clean.csv.gz", TCGA / "signatures.csv"
    out: dict = {}
    facts: dict = {}
    for mode in MODES:
        cohort = load_cohort(table, sig, None, dataclasses.replace(base.data, genomics_mode=mode))
        cfg0 = _cfg(base, seeds[0], ks[0], mode)
        split = make_split(cohort, cfg0.split.test_sites, cfg0.split.n_test_sites, cfg0.split.val_fraction,
                           cfg0.seed, cfg0.federation.train_sites)
        prep = prepare(cfg0, cohort, split.train)
        same, n_params = k_unused_genomics_only(base, ks, prep.group_sizes, prep.heads)
        facts[mode] = {"k_unused": same, "params": n_params, "groups": len(prep.group_sizes),
                       "features": int(sum(prep.group_sizes)), "n_test": int(len(split.test))}
        log(f"GBM-LGG {mode}: {len(prep.group_sizes)} group(s), {sum(prep.group_sizes)} features, "
            f"{n_params} parameters; model identical for K in {list(ks)}: {same}")
        run_ks = [base_k] if same else [k for k, m in _grid(ks, base_k, full) if m == mode]
        for k in run_ks:
            out[(k, mode)] = {}
            for seed in seeds:
                out[(k, mode)][seed] = _train(base, seed, k, mode, cohort, tmp / f"g{seed}-{mode}-{k}", log,
                                              f"GBM-LGG seed {seed} K={k:<2d} {mode:10s}")
    return out, facts


def table(results: dict, k_label=None) -> str:
    lines = ["| K | gene grouping | " + " | ".join(f"{t} {k}" for t, k in METRICS) + " | mean of the three |",
             "| --- | --- |" + " --- |" * (len(METRICS) + 1)]
    for (k, mode), per_seed in sorted(results.items(), key=lambda kv: (MODES.index(kv[0][1]), kv[0][0])):
        cells, means = [], []
        for task, _ in METRICS:
            vals = np.array([v[task] for v in per_seed.values() if v.get(task) is not None])
            cells.append(f"{vals.mean():.3f} ({vals.std():.3f})" if len(vals) else "-")
            if len(vals):
                means.append(vals.mean())
        label = k_label(k) if k_label else str(k)
        lines.append(f"| {label} | {mode} | " + " | ".join(cells) + f" | {np.mean(means):.3f} |")
    return "\n".join(lines)


def gbmlgg_section(args, tmp: Path, log) -> str:
    """The GBM-LGG genomics-only part: its intro (with the K check's outcome) and table."""
    t1 = time.perf_counter()
    res, facts = gbmlgg(args.k, args.gbm_seeds, tmp, log, args.base_k, args.full_grid)
    unused = all(f["k_unused"] for f in facts.values())
    ks = "/".join(map(str, args.k))
    note = "; ".join(f"{m}: {f['groups']} group(s), {f['features']} features, {f['params']:,} parameters"
                     for m, f in facts.items())
    n_test = next(iter(facts.values()))["n_test"]
    return (
        f"TCGA GBM-LGG, genomics only (configs/gbmlgg_genomics.yaml, {n_test} held-out patients, "
        f"training seeds {' '.join(map(str, args.gbm_seeds))}, mean (sd); "
        f"{(time.perf_counter() - t1) / 60:.1f} min). {note}. "
        + (f"The genomics-only model is identical for K = {ks} (same parameters and values): "
           "the prototypes live in the pathology branch, so K is not a hyper-parameter here and "
           "only K = " + str(args.base_k) + " was trained." if unused else
           "K changes the genomics-only model, so every K was trained.") + "\n\n"
        + table(res, (lambda k: f"any ({ks})") if unused else None))


def main(argv=None) -> int:
    """Run the synthetic and GBM-LGG grids, print the tables, optionally write them as a section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 5, 10, 20])
    ap.add_argument("--base-k", type=int, default=5, help="K of the gene-grouping comparison")
    ap.add_argument("--full-grid", action="store_true", help="every K with both groupings")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="synthetic cohorts")
    ap.add_argument("--gbm-seeds", type=int, nargs="+", default=[0, 1], help="GBM-LGG training seeds")
    ap.add_argument("--skip-synth", action="store_true")
    ap.add_argument("--skip-gbmlgg", action="store_true")
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    args = ap.parse_args(argv)
    logging.getLogger("umeml").setLevel(logging.ERROR)
    say = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_synth:
            t1 = time.perf_counter()
            res = synthetic(args.k, args.seeds, Path(tmp), say, args.base_k, args.full_grid)
            sections.append(f"Synthetic cohort (seeds {' '.join(map(str, args.seeds))}, 60 held-out patients "
                            f"per seed, mean (sd) over seeds; {(time.perf_counter() - t1) / 60:.1f} min):\n\n"
                            + table(res))
        if not args.skip_gbmlgg and TCGA.is_dir():
            sections.append(gbmlgg_section(args, Path(tmp), say))
    text = "\n\n".join(sections)
    print("\n" + text)
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min")
    if args.write:
        write_section(args.write, TITLE, f"Command: `{command(MODULE, argv)}` "
                      f"({(time.perf_counter() - t0) / 60:.0f} min). Centralized UMEML; "
                      "signatures = 6 gene groups (one SNN token each), flat = one group of all genomic columns.\n\n"
                      + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

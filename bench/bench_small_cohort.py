"""Benchmark: small tabular cohorts (<= 200 patients), umeml vs a penalised Cox model, survival only.

    python -m bench.bench_small_cohort [--sizes 100 200] [--seeds 0 1 2 3 4] [--write docs/benchmarks.md]

Each (size, seed) draws that many patients of TCGA GBM-LGG (``../shared/data``, genomics only,
MCAT's six gene groups) at random and splits them at random into test (30%), validation (15% of
the rest) and training patients; every model sees the same split. Task: survival only (a config
with ``tasks: [survival]``; the table's subtype column is not used).

- ``linear``: umeml's ``linear`` model (a linear discrete-time hazard on the standardised genomic
  vector, weight decay 0.01), trained by ``train_central`` with early stopping (patience 5,
  ``train.min_val_events`` 10: a validation c-index on fewer deaths does not select).
- ``umeml (genomics)``: UMEML with the genomic branch only, hidden 32, same training settings.
- ``cox``: lifelines ``CoxPHFitter(penalizer=0.1)`` (ridge) on the first 16 principal components
  of the standardised genomic vector, fitted on training + validation patients (it needs no
  validation split, so it gets those patients too).

The c-index is Harrell's on the test patients (lifelines, higher risk = shorter survival). The
goal: umeml does not lose to the penalised Cox model, i.e. its mean is not below Cox's by more
than the seed sd of the paired difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._harness import TCGA, loadavg, write_section

TITLE = "## Small tabular cohorts: umeml vs a penalised Cox model (survival)"
MODELS = ("linear", "umeml (genomics)", "cox")


def base_config():
    """The survival-only experiment the umeml models train with."""
    from umeml.config import config_from_dict

    return config_from_dict({
        "name": "small-cohort", "tasks": ["survival"],
        "survival": {"n_bins": 4},
        "model": {"name": "linear", "modalities": ["genomics"], "hidden_dim": 32, "dropout": 0.25},
        "train": {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01, "epochs": 30, "warmup_epochs": 1,
                  "batch_size": 16, "early_stopping_patience": 5, "min_val_events": 10, "bootstrap": 0,
                  "device": "cpu"},
    }, "bench_small_cohort")


def draw_split(n_patients: int, size: int, seed: int):
    """``size`` random patients split into train / val / test (30% test, 15% of the rest val)."""
    from umeml.data.splits import Split

    rng = np.random.default_rng(seed)
    chosen = rng.permutation(n_patients)[:size]
    n_test = int(round(0.3 * size))
    n_val = int(round(0.15 * (size - n_test)))
    test, val, train = chosen[:n_test], chosen[n_test:n_test + n_val], chosen[n_test + n_val:]
    return Split(np.sort(train), np.sort(val), np.sort(test), ())


def cox_c_index(cohort, split, seed: int, components: int = 16, penalizer: float = 0.1) -> float:
    """Test c-index of a ridge Cox model on principal components (fitted on train + val)."""
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index
    from sklearn.decomposition import PCA

    fit_idx = np.concatenate([split.train, split.val])
    x = cohort.genomics.astype(float)
    mean, std = x[fit_idx].mean(0), x[fit_idx].std(0) + 1e-8
    pca = PCA(n_components=components, random_state=seed).fit((x[fit_idx] - mean) / std)
    z = pca.transform((x - mean) / std)
    times, events = cohort.times_events()
    frame = pd.DataFrame(z[fit_idx], columns=[f"pc{i}" for i in range(components)])
    frame["T"], frame["E"] = times[fit_idx], events[fit_idx]
    cph = CoxPHFitter(penalizer=penalizer).fit(frame, "T", "E")
    risk = cph.predict_partial_hazard(pd.DataFrame(z[split.test], columns=frame.columns[:components])).to_numpy()
    return float(concordance_index(times[split.test], -risk, events[split.test]))


def umeml_c_index(cfg, cohort, split, out: Path) -> float:
    """Test c-index of one centralized umeml run on ``split``."""
    from umeml.train.central import train_central

    final = train_central(cfg, cohort, out, split=split, progress=False)
    entry = final["test"]["survival"].get("c_index", {})
    return float(entry["value"]) if isinstance(entry, dict) and entry.get("value") is not None else float("nan")


def run(sizes, seeds, log=print) -> dict:
    """{size: {model: [c-index per seed]}}."""
    import torch

    from umeml.data.cohort import load_cohort

    torch.set_num_threads(1)
    base = base_config()
    cohort = load_cohort(TCGA / "tcga_gbmlgg_all_clean.csv.gz", TCGA / "signatures.csv", None, base.data, base.tasks)
    results: dict = {size: {m: [] for m in MODELS} for size in sizes}
    variants = {"linear": base,
                "umeml (genomics)": dataclasses.replace(base, model=dataclasses.replace(base.model, name="umeml"))}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for seed in seeds:
                split = draw_split(len(cohort), size, seed)
                t0 = time.perf_counter()
                row = {m: umeml_c_index(dataclasses.replace(cfg, seed=seed), cohort, split, Path(tmp) / f"{size}-{seed}-{i}")
                       for i, (m, cfg) in enumerate(variants.items())}
                row["cox"] = cox_c_index(cohort, split, seed)
                for m, v in row.items():
                    results[size][m].append(v)
                events = int(cohort.times_events(split.test)[1].sum())
                log(f"n {size} seed {seed} (test {len(split.test)}, {events} deaths): "
                    + "  ".join(f"{m} {v:.3f}" for m, v in row.items()) + f"  ({time.perf_counter() - t0:.0f} s)")
    return results


def table(results: dict) -> str:
    """Mean (sd) per size and model, and the paired difference to Cox with the verdict."""
    lines = ["| patients | " + " | ".join(MODELS) + " | linear - cox (paired sd) | umeml - cox (paired sd) |",
             "| --- |" + " --- |" * (len(MODELS) + 2)]
    verdicts = []
    for size, per in results.items():
        cells = [f"{np.nanmean(per[m]):.3f} ({np.nanstd(per[m]):.3f})" for m in MODELS]
        diffs = []
        for m in ("linear", "umeml (genomics)"):
            d = np.array(per[m]) - np.array(per["cox"])
            diffs.append(f"{np.nanmean(d):+.3f} ({np.nanstd(d):.3f})")
            lost = np.nanmean(d) < -np.nanstd(d)
            verdicts.append(f"{m} at {size}: {'loses' if lost else 'does not lose'}")
        lines.append(f"| {size} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    return "\n".join(lines) + "\n\nGoal umeml does not lose to penalised Cox (mean difference not below minus its " \
        "paired sd): " + "; ".join(verdicts)


def main(argv=None) -> int:
    """Run, print, optionally write the section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    args = ap.parse_args(argv)
    if any(s > 200 or s < 20 for s in args.sizes):
        ap.error("--sizes: small cohorts are 20 to 200 patients")
    load0 = loadavg()
    t0 = time.perf_counter()
    results = run(args.sizes, args.seeds, log=lambda s: print(s, flush=True))
    load = f"load average before / after {load0} / {loadavg()}"
    text = table(results)
    print(text + f"\n\n{(time.perf_counter() - t0) / 60:.1f} min; {load}")
    if args.write:
        cmd = ("python -m bench.bench_small_cohort --sizes " + " ".join(map(str, args.sizes)) + " --seeds "
               + " ".join(map(str, args.seeds)))
        write_section(args.write, TITLE, f"Command: `nice -n 5 {cmd}` ({(time.perf_counter() - t0) / 60:.0f} min, "
                      f"1 torch thread, {load}). Mean (sd) of the test c-index over seeds.\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""UMEML vs the baselines on the synthetic cohort, centralized, over several seeds, next to the oracle.

    python bench/bench_synthetic.py [--seeds 0 1 2] [--models umeml abmil snn late_fusion] [--write docs/benchmarks.md]

Each seed generates its own demo-sized cohort (4 sites x 60 patients) and trains every model
with configs/demo.yaml (only the model name changes), testing on the same held-out site.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = (("grade", "auc_macro"), ("subtype", "auc_macro"), ("survival", "c_index"))


def run(seeds, models, epochs=None) -> dict:
    """Test metrics per model and seed, and the oracle's, as nested dicts."""
    from umeml.config import load_config
    from umeml.data.cohort import load_data_dir
    from umeml.data.synth import SynthSpec, generate
    from umeml.train.central import train_central

    base = load_config(REPO / "configs" / "demo.yaml")
    if epochs:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=epochs))
    out: dict = {m: {} for m in models}
    out["oracle"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            data = Path(tmp) / f"seed{seed}"
            generate(SynthSpec(sites=4, patients=60, seed=seed), data)
            oracle = json.loads((data / "oracle.json").read_text())
            out["oracle"][seed] = {t: oracle[t].get("auc_macro", oracle[t].get("c_index")) for t, _ in METRICS}
            cohort = load_data_dir(data, base.data)
            for name in models:
                cfg = dataclasses.replace(base, seed=seed, model=dataclasses.replace(base.model, name=name))
                t0 = time.perf_counter()
                final = train_central(cfg, cohort, Path(tmp) / f"run-{seed}-{name}", progress=False)
                out[name][seed] = {t: final["test"][t][k]["value"] for t, k in METRICS}
                print(f"seed {seed} {name:12s} " + "  ".join(f"{t} {v:.3f}" for t, v in out[name][seed].items())
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def table(results: dict) -> str:
    """Mean (sd) over seeds per model and task, UMEML's share of the oracle, and who wins."""
    lines = ["| model | " + " | ".join(f"{t} {k}" for t, k in METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    for name, per_seed in results.items():
        cells = []
        for task, _ in METRICS:
            vals = np.array([v[task] for v in per_seed.values() if v.get(task) is not None])
            cells.append(f"{vals.mean():.3f} ({vals.std():.3f})" if len(vals) else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "umeml" in results:
        wins = []
        for task, _ in METRICS:
            mine = np.mean([v[task] for v in results["umeml"].values()])
            others = [np.mean([v[task] for v in results[m].values()]) for m in results if m not in ("umeml", "oracle")]
            oracle = np.mean([v[task] for v in results["oracle"].values()])
            wins.append(f"{task}: beats all baselines {'yes' if others and mine > max(others) else 'no'}, "
                        f"{100 * mine / oracle:.0f}% of oracle")
        lines.append("\n" + "; ".join(wins))
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run, print the table, optionally append it to a markdown file."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["umeml", "abmil", "snn", "late_fusion"])
    ap.add_argument("--epochs", type=int, help="override train.epochs of configs/demo.yaml")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args(argv)
    results = run(args.seeds, args.models, args.epochs)
    text = table(results)
    print(text)
    if args.write:
        stamp = datetime.date.today().isoformat()
        with args.write.open("a") as f:
            f.write(f"\n## UMEML vs baselines on the synthetic cohort ({stamp}, {platform.machine()}, "
                    f"{os.cpu_count()} cores, CPU)\n\nCommand: `python bench/bench_synthetic.py --seeds "
                    f"{' '.join(map(str, args.seeds))}`; centralized, configs/demo.yaml, held-out site test set "
                    "(60 patients); mean (sd) over seeds.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

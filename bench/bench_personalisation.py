"""The personalisation wave replayed on finished federations: guarded vs unguarded (or other
``federation.personalisation`` settings) on the same global models, folds and sites.

    python -m bench.bench_personalisation --runs OUT [--variants NAME ...] [--write docs/benchmarks.md]

``OUT`` is a ``bench_gbmlgg --out`` directory: per fold ``foldK/fed-umeml-federated`` holds the
run's config, preprocessing and selected global weights (``checkpoints/best.pt``, what the wave
sent). Every training site of the run personalises those weights again, in this process, with
each variant's settings (the site code is the wave's own, :func:`umeml.federation.personalise.personalise`),
and the variants are compared per fold on the training sites' own validation (combined over the
sites with >= k validation patients, as the run's own wave). The variant that equals the run's
own settings must reproduce its ``final.json`` exactly (printed as the replay check): the replay
is the wave, not an approximation of it. No held-out patient is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench._harness import PRIMARY, command, spread, stamp, write_section
from bench._harness import TCGA as DATA

RUN = "fed-umeml-federated"
SECTION = "## TCGA GBM-LGG, guarded personalisation replayed on the 5-fold federations (issue 13)"
# variants: overrides of the run's federation.personalisation (the first is the reference of the
# paired differences)
VARIANTS = {
    "unguarded": {"guard": False},
    "guarded": {"guard": True},
    "guarded, loss and metric": {"guard": True, "criterion": "loss_and_metric"},
    "guarded, min 8 inner deaths": {"guard": True, "min_inner_events": 8},
    "guarded, inner fraction 0.33": {"guard": True, "inner_fraction": 0.33},
}


def replay(run_dir: Path, load_cohort, variants: dict[str, dict]) -> dict:
    """Every variant's personalisation summary on one federation's selected weights (the cohort
    from ``load_cohort(data_config)``), and the replay check against the run's own wave."""
    import torch

    from umeml.config import load_config
    from umeml.federation.personalise import personalise, summarise_personalisation
    from umeml.federation.protocol import Preprocessing
    from umeml.federation.site import SiteRuntime
    from umeml.model.io import load

    cfg = load_config(run_dir / "config.yaml", federated=True)
    cohort = load_cohort(cfg.data)
    prep = Preprocessing.from_json((run_dir / "preprocessing.json").read_text())
    state = {k: v.detach().clone() for k, v in load(run_dir / "checkpoints" / "best.pt")[0].state_dict().items()}
    training = json.loads((run_dir / "roles.json").read_text())["training"]
    fed = cfg.federation
    out: dict = {}
    for name, overrides in variants.items():
        c = dataclasses.replace(cfg, federation=dataclasses.replace(
            fed, personalisation=dataclasses.replace(fed.personalisation, **overrides)))
        torch.manual_seed(0)
        reports = {s: personalise(SiteRuntime(s, cohort, cohort.site_indices(s), k_min=fed.k_min_patients,
                                              device="cpu", dp=fed.local_dp), c, prep, state, fed.personalise_epochs)
                   for s in training}
        out[name] = summarise_personalisation(reports, fed.personalise_epochs)
    own = json.loads((run_dir / "final.json").read_text()).get("personalisation") or {}
    same = [n for n, v in out.items() if _without_seconds(v) == _without_seconds(own)]
    return {"variants": out, "reproduces_the_run": same,
            "run_guard": dataclasses.asdict(fed.personalisation), "epochs": fed.personalise_epochs}


def _without_seconds(summary: dict) -> dict:
    return {**summary, "sites": {s: {k: v for k, v in r.items() if k != "seconds"}
                                 for s, r in (summary.get("sites") or {}).items()}}


def gains(summary: dict) -> dict[str, float]:
    """Personalised minus global per primary metric (``task key``) of one summary."""
    return dict(summary.get("personalised_minus_global") or {})


def tables(folds: dict[int, dict]) -> str:
    """Per fold and variant the gains and the heads personalised; per variant mean ± sd over
    folds (goal >= 0) and the paired difference against the first variant."""
    names = [f"{t} {k}" for t, k in PRIMARY]
    variants = list(next(iter(folds.values()))["variants"])
    lines = ["| fold | variant | sites reporting (validation patients) | "
             + " | ".join(f"{n}: personalised minus global" for n in names)
             + " | sites personalising grade / subtype / survival |",
             "| --- | --- | --- |" + " --- |" * (len(names) + 1)]
    for k, rec in folds.items():
        for v in variants:
            s = rec["variants"][v]
            g = gains(s)
            heads = s.get("sites_personalising") or {}
            lines.append(f"| {k} | {v} | {s['n_sites']} ({s['n_validation']}) | "
                         + " | ".join(f"{g[n]:+.3f}" if n in g else "-" for n in names) + " | "
                         + " / ".join(str(heads.get(t, "-")) for t, _ in PRIMARY) + " |")
    lines += ["", "Per variant, mean ± sd over folds (ddof 1) of personalised minus global (goal >= 0; a mean "
              "inside its spread is a tie), and minus the first variant paired per fold:", ""]
    ref = variants[0]
    for v in variants:
        per = {n: [gains(rec["variants"][v])[n] for rec in folds.values() if n in gains(rec["variants"][v])]
               for n in names}
        line = f"- {v}: " + "; ".join(f"{n} {spread(d)} ({'met' if d and np.mean(d) >= 0 else 'not met'})"
                                        for n, d in per.items())
        if v != ref:
            paired = {n: [gains(r["variants"][v])[n] - gains(r["variants"][ref])[n] for r in folds.values()
                          if n in gains(r["variants"][v]) and n in gains(r["variants"][ref])] for n in names}
            line += f"; minus {ref}: " + "; ".join(f"{n} {spread(d)}" for n, d in paired.items())
        lines.append(line)
    checks = [f"fold {k}: {', '.join(rec['reproduces_the_run']) or 'NONE'}" for k, rec in folds.items()]
    lines += ["", "Replay check (the variant(s) whose summary equals the run's own final.json personalisation, "
              "per-site seconds aside): " + "; ".join(checks)]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="a bench_gbmlgg --out directory (foldK/fed-umeml-federated)")
    ap.add_argument("--table", type=Path, default=DATA / "tcga_gbmlgg_all_clean.csv.gz")
    ap.add_argument("--signatures", type=Path, default=DATA / "signatures.csv")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                    help=f"of: {', '.join(repr(v) for v in VARIANTS)} (default all; the first is the reference)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--write", type=Path, help="replace this bench's section of this markdown file")
    ap.add_argument("--section", default=SECTION, help="with --write: the section heading")
    ap.add_argument("--note", default="", help="a paragraph under the tables")
    return ap


def main(argv=None) -> int:
    """Replay every fold's wave with every variant, print the tables, optionally write them."""
    args = _parser().parse_args(argv)
    run_dirs = sorted(args.runs.glob(f"fold*/{RUN}"), key=lambda p: int(p.parent.name[4:]))
    if not run_dirs:
        print(f"error: no fold*/{RUN} run directories under {args.runs}", file=sys.stderr)
        return 2
    import torch

    from umeml.data.cohort import load_cohort

    torch.set_num_threads(args.threads)
    variants = {v: VARIANTS[v] for v in (args.variants or VARIANTS)}
    t0, loads = time.perf_counter(), [os.getloadavg()[0]]
    folds = {}
    for run_dir in run_dirs:
        folds[int(run_dir.parent.name[4:])] = replay(
            run_dir, lambda data: load_cohort(args.table, args.signatures, None, data), variants)
        loads.append(os.getloadavg()[0])
    (args.runs / "personalisation_replay.json").write_text(json.dumps(folds, indent=2))
    body = tables(folds)
    print(body)
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.0f} s; 1-min load {min(loads):.1f} to {max(loads):.1f}")
    if args.write:
        intro = (f"Command: `{command('bench.bench_personalisation', argv)}` (`nice -n 5`, torch threads "
                 f"{args.threads}; {wall:.0f} s for all folds and variants, 1-min load {min(loads):.1f} to "
                 f"{max(loads):.1f}). The personalisation wave replayed on each fold's selected global weights "
                 "(`checkpoints/best.pt` of `umeml federated`, the run's preprocessing and training sites): each "
                 "variant overrides `federation.personalisation` of the run's config; the training sites' own "
                 "validation, combined over the sites with >= k = 10 validation patients.\n\n")
        write_section(args.write, args.section, intro + body + ("\n\n" + args.note if args.note else "") + "\n",
                      when=stamp())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

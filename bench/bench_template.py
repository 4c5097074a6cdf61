"""The template for new consortia (configs/demo.yaml): its federated settings against the earlier
ones (and candidate fixes) on the synthetic demo cohort, over seeds, paired per seed.

    python -m bench.bench_template [--seeds 0 1 2 3 4] [--settings NAME ...] [--cache runs.jsonl]
                                   [--write docs/benchmarks.md]

Each seed generates the demo cohort the main job uses (4 sites x 60 patients, ``SynthSpec(seed)``),
holds out the site ``umeml-server simulate`` would (``plan_sites`` with the seed) and runs one
in-process federation per setting (``bench._inprocess.federate``: the real coordinator and site
handlers, no Ray). A setting is a set of overrides of configs/demo.yaml (``SETTINGS``).

Two scores per run:

- held-out: the held-out site's metrics of the model the run returns (what the comparison is
  about; never used to choose a setting);
- validation: the training sites' validation score of the returned model (the selection score,
  mean primary metric over tasks, combined over the training sites): the only figure a fix may
  be chosen on.

Personalisation is switched off in every setting: it runs after the held-out evaluation and
changes none of these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._harness import PRIMARY, REPO, loadavg, mean_sd, pick, stamp, with_overrides, write_section

SITES, PATIENTS = 4, 60  # the main job's synthetic cohort (umeml-server simulate's default)
TITLE = "## Template configs/demo.yaml: federated settings over seeds (issue 13)"
NEW = "new: sgd 0.02, fedavgm 0.5, cosine, best_validation"
OLD = "old: adamw 1e-3, fedavg, constant, last"
GBMLGG = "GBM-LGG's: sgd 0.02, fedavgm 0.9, cosine, last"  # configs/gbmlgg_federated.yaml's optimisation
# name -> overrides of configs/demo.yaml (section -> key -> value); each setting names every
# optimisation key it relies on, so it means the same whatever demo.yaml ships
_SGD = {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9}
_ADAMW = {"optimizer": "adamw", "lr": 0.001}
_FEDAVGM = {"strategy": "fedavgm", "server_momentum": 0.5, "lr_schedule": "cosine", "warmup_rounds": 1,
            "optimizer_state": "reset"}
SETTINGS = {
    OLD: {"train": _ADAMW, "federation": {"strategy": "fedavg", "lr_schedule": "constant", "selection": "last",
                                          "optimizer_state": "reset"}},
    NEW: {"train": _SGD, "federation": {**_FEDAVGM, "selection": "best_validation"}},
    "new, selection last": {"train": _SGD, "federation": {**_FEDAVGM, "selection": "last"}},
    "new, sgd lr 0.05": {"train": {**_SGD, "lr": 0.05}, "federation": {**_FEDAVGM, "selection": "best_validation"}},
    GBMLGG: {"train": _SGD, "federation": {**_FEDAVGM, "server_momentum": 0.9, "selection": "last"}},
    "sgd 0.05, fedavgm 0.9, cosine, last": {"train": {**_SGD, "lr": 0.05},
                                            "federation": {**_FEDAVGM, "server_momentum": 0.9, "selection": "last"}},
    "adamw 1e-3, fedavgm 0.5, cosine, last": {"train": _ADAMW, "federation": {**_FEDAVGM, "selection": "last"}},
}


def setting_config(base, overrides: dict, seed: int):
    """configs/demo.yaml with one setting's overrides and ``seed``, personalisation off (it runs
    after the held-out evaluation and changes no figure here), checked like a file."""
    return with_overrides(base, overrides, "bench_template setting", federation__personalise_epochs=0, seed=seed)


def _intro(args, loads: list[float]) -> str:
    """The section's first paragraph, its numbers taken from this run (cohort, config, machine)."""
    from umeml.config import load_config

    split = load_config(REPO / "configs" / "demo.yaml").split
    n_train = SITES - max(len(split.test_sites), split.n_test_sites)
    cmd = (f"python -m bench.bench_template --seeds {' '.join(map(str, args.seeds))} --settings "
           + " ".join(repr(s) for s in args.settings))
    return (f"Command: `nice -n 5 {cmd}` ({args.threads} torch thread(s); 1-min load average "
            f"{loads[0] if loads else '?'} to {loads[-1] if loads else '?'} after the runs, on a {os.cpu_count()}-core "
            f"machine). Each seed: the demo cohort of the main job ({SITES} sites x {PATIENTS} "
            "patients, `SynthSpec(seed)`), the held-out site `umeml-server simulate` picks for that seed, one "
            "in-process federation per setting (the real coordinator and site handlers, `bench/_inprocess.py`), "
            "configs/demo.yaml with the setting's overrides, personalisation off (it changes no figure here). "
            "Held-out = the held-out site's metrics of the returned model; validation = the training sites' "
            "validation score of the returned model (mean primary metric over tasks, combined over the "
            f"{n_train} training sites, a {split.val_fraction:.0%} validation split of each, about "
            f"{round(PATIENTS * split.val_fraction)} patients): only the validation score may choose a setting.\n\n")


def returned_validation(final: dict, run_dir: Path, k_min: int) -> float | None:
    """The training sites' validation score of the model the run returned: the selected round's
    score, or (rule ``last``) the final wave's validation of the last round."""
    import torch

    from umeml.federation.selection import validation_score

    selection = final.get("selection") or {}
    if "score" in selection:
        return float(selection["score"])
    history = torch.load(run_dir / "resume.pt", weights_only=False)["history"]
    score = validation_score((history[-1].get("evaluation") or {}).get("validation") or {}, k_min)
    return None if score is None else float(score["score"])


def run_one(base, name: str, seed: int, data: Path, cohort, tmp: Path) -> dict:
    """One federation of setting ``name`` on this seed's cohort: held-out metrics, validation score."""
    from bench._inprocess import federate
    from umeml.data.source import CohortSource

    cfg = setting_config(base, SETTINGS[name], seed)
    run_dir = tmp / f"seed{seed}-{''.join(c if c.isalnum() else '-' for c in name)}"
    t0 = time.perf_counter()
    final = federate(cfg, cohort, CohortSource(data_dir=str(data)), run_dir)
    secs = time.perf_counter() - t0
    return {"seed": seed, "setting": name, "held_out": pick(final["held_out_combined"], PRIMARY),
            "validation": returned_validation(final, run_dir, cfg.federation.k_min_patients),
            "round": (final.get("selection") or {}).get("round"), "seconds": round(secs, 1),
            "held_out_sites": final["held_out_sites"]}


def _cached(path: Path | None) -> dict:
    done = {}
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["seed"], r["setting"])] = r
    return done


def run(seeds: list[int], names: list[str], cache: Path | None, log=print) -> list[dict]:
    """Every setting on every seed (cached runs are not repeated); returns the run records."""
    from umeml.config import load_config
    from umeml.data.cohort import load_data_dir
    from umeml.data.synth import SynthSpec, generate

    base = load_config(REPO / "configs" / "demo.yaml")
    done, rows = _cached(cache), []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            data, cohort = Path(tmp) / f"data{seed}", None
            for name in names:
                if (seed, name) in done:
                    rows.append(done[(seed, name)])
                    continue
                if cohort is None:
                    generate(SynthSpec(sites=SITES, patients=PATIENTS, seed=seed), data, overwrite=True)
                    cohort = load_data_dir(data, base.data)
                row = run_one(base, name, seed, data, cohort, Path(tmp))
                row["load"] = loadavg().split()[0]
                rows.append(row)
                if cache is not None:
                    with cache.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                vals = "  ".join(f"{t} {v:.3f}" if v is not None else f"{t} -" for t, v in row["held_out"].items())
                log(f"seed {seed} {name:45s} held-out {vals}  validation {row['validation']}  "
                    f"round {row['round']}  ({row['seconds']:.0f} s, load {row['load']})")
    return rows


def _by(rows: list[dict], name: str, key: str, task: str | None = None) -> dict[int, float]:
    out = {}
    for r in rows:
        if r["setting"] == name:
            v = r[key] if task is None else r[key].get(task)
            if v is not None:
                out[r["seed"]] = float(v)
    return out


def _paired(a: dict, b: dict) -> np.ndarray:
    return np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])


def _paired_lines(rows: list[dict], names: list[str], reference: str, tasks: list[str]) -> list[str]:
    """One line per setting other than ``reference`` with at least two seeds shared with it."""
    out = []
    for name in names:
        if name == reference:
            continue
        parts = []
        for t in tasks:
            d = _paired(_by(rows, name, "held_out", t), _by(rows, reference, "held_out", t))
            if len(d) > 1:
                verdict = "tie" if abs(d.mean()) <= d.std(ddof=1) else ("better" if d.mean() > 0 else "worse")
                parts.append(f"{t} {d.mean():+.3f} ± {d.std(ddof=1):.3f} ({verdict})")
        d = _paired(_by(rows, name, "validation"), _by(rows, reference, "validation"))
        if len(d) > 1:
            parts.append(f"validation {d.mean():+.3f} ± {d.std(ddof=1):.3f}")
        if parts:
            out.append(f"- {name} minus reference: " + "; ".join(parts))
    return out


def tables(rows: list[dict], names: list[str], reference: str = NEW) -> str:
    """Mean ± sd over seeds per setting (held-out and validation), and each setting's paired
    per-seed difference from ``reference`` (a tie when |mean| <= sd of the differences)."""
    tasks = [t for t, _ in PRIMARY]
    head = "| setting | seeds | " + " | ".join(f"held-out {t} {k}" for t, k in PRIMARY) + \
        " | validation score (training sites) | mean s per run |"
    lines = [head, "| --- | --- |" + " --- |" * (len(tasks) + 2)]
    for name in names:
        seeds = sorted({r["seed"] for r in rows if r["setting"] == name})
        secs = [r["seconds"] for r in rows if r["setting"] == name]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(mean_sd(_by(rows, name, "held_out", t).values())
                                                          for t in tasks)
                     + f" | {mean_sd(_by(rows, name, 'validation').values())} | {np.mean(secs):.0f} |")
    paired = _paired_lines(rows, names, reference, tasks)
    if paired:
        lines += ["", f"Paired per-seed differences from `{reference}` (mean ± sd over seeds; a difference "
                  "inside its sd is a tie):", "", *paired]
    else:  # one setting, or fewer than two seeds shared with the reference: no spread to judge by
        lines += ["", f"No paired differences from `{reference}`: they need another setting and at least two "
                  "seeds run by both."]
    per_seed = ["", "Per seed, held-out grade / subtype / c-index (held-out site):", "",
                "| seed | held-out site | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for seed in sorted({r["seed"] for r in rows}):
        site = next((",".join(r["held_out_sites"]) for r in rows if r["seed"] == seed), "-")
        cells = []
        for name in names:
            r = next((r for r in rows if r["seed"] == seed and r["setting"] == name), None)
            cells.append(" / ".join(f"{r['held_out'][t]:.2f}" if r and r["held_out"].get(t) is not None else "-"
                                    for t in tasks))
        per_seed.append(f"| {seed} | {site} | " + " | ".join(cells) + " |")
    return "\n".join(lines + per_seed)


def main(argv=None) -> int:
    """Run the settings over the seeds, print the tables, optionally write the section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), metavar="NAME", default=[OLD, NEW],
                    help=f"of: {', '.join(repr(s) for s in SETTINGS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--cache", type=Path, help="JSON-lines file of finished runs: resume an interrupted benchmark")
    ap.add_argument("--note", default="", help="a sentence appended to the section (what the reader must know)")
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load0 = loadavg()
    t0 = time.perf_counter()
    rows = run(args.seeds, args.settings, args.cache, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    load1 = loadavg()
    text = tables(rows, args.settings)
    print(text)
    loads = sorted(float(r["load"]) for r in rows if r.get("load"))
    print(f"\nwall {wall / 60:.1f} min; load average before / after {load0} / {load1}")
    if args.write:
        intro = _intro(args, loads)
        write_section(args.write, TITLE, intro + text + (f"\n\n{args.note}" if args.note else "") + "\n",
                      when=stamp())
    return 0


if __name__ == "__main__":
    sys.exit(main())

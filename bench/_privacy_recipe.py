"""Privacy-utility of the DP recipe (issue 17): public initialisation + private fine-tuning.

Cohort: one synthetic world (``SynthSpec(sites=7, seed=0)``), whose sites differ in stain
(per-site feature offset and scale) and label mix (per-site subtype proportions). Sites
A4-A6 are the "public" cohort (trained centrally into the public checkpoint), A0-A2 the
private training sites, A3 the held-out site (none of its patients trains anywhere). A cohort
of another generator seed would be another world (other morphotype centroids and gene
effects), on which a public model has nothing to transfer; hence other sites of the same seed.

Rows, at each epsilon (inf = no DP; with DP the recipe of ``federation.dp_recipe`` at every
site, noise calibrated for the planned rounds x steps):
- ``umeml all``: UMEML from scratch, every parameter trainable (today's setting);
- ``umeml public + decoder`` / ``+ heads``: from the public checkpoint, only that part trains;
- ``linear``: the linear model from scratch;
- ``public alone``: the public checkpoint on the held-out site (no private training);
- the non-DP federated run of the demo config (all trainable, AdamW) as the reference.
Federations run in this process (:mod:`bench._inprocess`), metrics on the held-out site.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from bench._harness import PRIMARY, REPO, metric_entry

PUBLIC, PRIVATE, HELD = ("A4", "A5", "A6"), ("A0", "A1", "A2"), ("A3",)
VARIANTS = ("umeml all", "umeml public + decoder", "umeml public + heads", "linear")


def cohort(work: Path):
    """The 7-site synthetic cohort of the module docstring, its source."""
    from umeml.data.cohort import load_data_dir
    from umeml.data.source import CohortSource
    from umeml.data.synth import SynthSpec, generate

    base = base_config()
    data = work / "synth7"
    if not (data / "table.csv").is_file():
        generate(SynthSpec(sites=7, patients=60, seed=0), data, overwrite=True)
    return load_data_dir(data, base.data), CohortSource(data_dir=str(data))


MAX_PATCHES = 64  # bags cut to 64 patches (the demo uses 256): a shared 2-core machine


def _small(cfg):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_patches=MAX_PATCHES),
                               train=dataclasses.replace(cfg.train, bootstrap=100))


def base_config(rounds: int = 10):
    """configs/demo_dp.yaml with the bench's sites; evaluation only after the last round."""
    from umeml.config import load_config

    cfg = _small(load_config(REPO / "configs" / "demo_dp.yaml"))
    fed = dataclasses.replace(cfg.federation, train_sites=PRIVATE, rounds=rounds, evaluate_every=rounds,
                              init_checkpoint=None)
    return dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, test_sites=HELD), federation=fed)


def public_checkpoint(cohort_, seed: int, work: Path) -> tuple[Path, dict]:
    """Train UMEML centrally on the public sites; returns the best checkpoint and its held-out metrics."""
    from umeml.config import load_config
    from umeml.data.splits import make_split
    from umeml.train.central import train_central

    demo = _small(load_config(REPO / "configs" / "demo.yaml"))
    cfg = dataclasses.replace(demo, seed=seed, name="public", split=dataclasses.replace(demo.split, test_sites=HELD))
    split = make_split(cohort_, HELD, 1, cfg.split.val_fraction, seed, PUBLIC)
    out = work / f"public-{seed}"
    if (out / "final.json").is_file():  # trained by an earlier process on the same work dir
        from umeml.rundir import read_final

        return out / "checkpoints" / "best.pt", read_final(out / "final.json").to_json()["test"]
    final = train_central(cfg, cohort_, out, split=split, progress=False)
    return out / "checkpoints" / "best.pt", final["test"]


def variant_config(base, variant: str, eps: float, seed: int, public: Path):
    """The experiment of one row."""
    from umeml.server.cli import with_local_dp

    train, model, fed = base.train, base.model, base.federation
    if variant == "linear":
        model = dataclasses.replace(model, name="linear")
    elif variant != "umeml all":
        fed = dataclasses.replace(fed, init_checkpoint=str(public))
        train = dataclasses.replace(train, trainable=variant.rsplit(" ", 1)[1])
    cfg = dataclasses.replace(base, seed=seed, model=model, train=train, federation=fed,
                              name=f"{variant.replace(' ', '-').replace('+', '')}-{eps:g}-{seed}")
    if math.isinf(eps):  # demo_dp.yaml turns local DP on: off here
        no_dp = dataclasses.replace(cfg.federation.local_dp, enabled=False)
        return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, strategy="fedavg", local_dp=no_dp))
    cfg = with_local_dp(cfg, eps)
    return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, strategy="fedavgm"))


def metrics_row(final: dict) -> dict:
    """The primary held-out metrics of a final.json (federated) or a central ``test`` dict."""
    res = final.get("pooled") or final.get("held_out_combined") if "held_out" in final else final
    out = {}
    for task, key in PRIMARY:
        m = metric_entry(res, task, key) or {}
        out[f"{task}_{key}"] = m.get("value")
    return out


def run_grid(epsilons, seeds, work: Path, variants=VARIANTS, reference: bool = True, log=print) -> list[dict]:
    """Every row of the grid, printed as it comes."""
    from bench._inprocess import federate
    from umeml.config import load_config

    cohort_, source = cohort(work)
    base, rows = base_config(), []
    for seed in seeds:
        t0 = time.perf_counter()
        public, test = public_checkpoint(cohort_, seed, work)
        rows.append({"variant": "public alone", "epsilon": None, "seed": seed, "spent": None,
                     "wall_s": time.perf_counter() - t0, **metrics_row(test)})
        log(rows[-1])
        if reference:
            demo = _small(load_config(REPO / "configs" / "demo.yaml"))
            fed = dataclasses.replace(demo.federation, train_sites=PRIVATE, evaluate_every=demo.federation.rounds)
            ref = dataclasses.replace(demo, seed=seed, name=f"reference-{seed}", split=base.split, federation=fed)
            rows.append(_run(federate, ref, cohort_, source, work, "non-DP reference (demo.yaml)", math.inf, seed))
            log(rows[-1])
        for eps in epsilons:
            for variant in variants:
                cfg = variant_config(base, variant, eps, seed, public)
                rows.append(_run(federate, cfg, cohort_, source, work, variant, eps, seed))
                log(rows[-1])
    return rows


def _run(federate, cfg, cohort_, source, work, variant, eps, seed) -> dict:
    t0 = time.perf_counter()
    final = federate(cfg, cohort_, source, work / cfg.name, held_out=HELD)
    ledger = final.get("privacy") or {}
    return {"variant": variant, "epsilon": eps, "seed": seed, "spent": ledger.get("local_max_epsilon"),
            "wall_s": time.perf_counter() - t0, **metrics_row(final)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sd (ddof 1) over seeds for each (variant, epsilon)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["variant"], r["epsilon"]), []).append(r)
    out = []
    for (variant, eps), rs in groups.items():
        s = {"variant": variant, "epsilon": eps, "seeds": len(rs),
             "spent": max((r["spent"] for r in rs if r["spent"] is not None), default=None),
             "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
        for task, key in PRIMARY:
            vals = [r[f"{task}_{key}"] for r in rs if r[f"{task}_{key}"] is not None]
            s[f"{task}_{key}"] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0) if vals else None
        out.append(s)
    return out


def format_summary(s: dict) -> str:
    """A markdown row: variant, epsilon, spent, the three metrics as mean +- sd, wall."""
    eps = "-" if s["epsilon"] is None else ("inf (no DP)" if math.isinf(s["epsilon"]) else f"{s['epsilon']:g}")
    spent = "-" if s["spent"] is None else f"{s['spent']:.2f}"
    cells = []
    for task, key in PRIMARY:
        v = s[f"{task}_{key}"]
        cells.append("-" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}")
    return f"| {s['variant']} | {eps} | {spent} | {s['seeds']} | " + " | ".join(cells) + f" | {s['wall_s']:.0f} s |"


def read_rows(log: Path) -> list[dict]:
    """The row dicts a ``--recipe`` process printed (one per line) from its log."""
    import ast

    # repr(float("inf")) is not a literal; 1e999 parses to inf
    return [ast.literal_eval(line.replace(": inf,", ": 1e999,")) for line in Path(log).read_text().splitlines()
            if line.startswith("{'variant'")]

"""Privacy-utility of the DP recipe (issue 17): public initialisation + private fine-tuning.

Two worlds, each with public sites (trained centrally into the public checkpoint), private
training sites (the federation) and held-out sites (never trained on, the metrics):

- ``synthetic``: one synthetic world (``SynthSpec(sites=7, seed=0)``). Public sites A4-A6 come
  from the same world generated with a 3x stronger stain shift (``stain_shift`` 1.2 instead of
  0.4: the same patients and biology, each site's feature offset and scale 3x further from the
  unstained features) and have their own label mix (per-site subtype proportions of the
  generator); private sites A0-A2 and held-out A3 have the demo's stain. A cohort of another
  generator seed would be another world (other morphotype centroids and gene effects), on
  which a public model has nothing to transfer; hence the same seed with another stain.
- ``gbmlgg``: TCGA GBM-LGG genomics. Held-out E1, CS, 27 (configs/gbmlgg_genomics.yaml), private
  = the 8 largest other TSS sites (its ``train_sites``), public = every remaining TSS site.

Rows, at each epsilon (with DP: the recipe of ``federation.dp_recipe`` at every site, noise
calibrated for the planned rounds x steps; ``inf``: the identical run without DP, i.e.
``dp_recipe.apply_without_dp``: same optimizer, Poisson batches, steps, rounds, server
momentum, initialisation and trainable part, no clipping and no noise):
- ``umeml all``: UMEML from scratch, every parameter trainable;
- ``umeml public + heads`` / ``+ decoder``: from the public checkpoint, only that part trains;
- ``linear``: the linear model from scratch;
- ``public alone``: the public checkpoint on the held-out sites (no private training);
- ``reference``: the non-DP federated run (the world's federated config as shipped:
  configs/demo.yaml or configs/gbmlgg_federated.yaml, UMEML from scratch, all trainable) on
  the same private sites: what the consortium gets without privacy (the issue's reference).
Federations run in this process (:mod:`bench._inprocess`); metrics on the held-out sites
(pooled), validation metrics (mean over the training sites' validation splits) for tuning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from bench._harness import PRIMARY, REPO, TCGA, metric_entry

VARIANTS = ("umeml all", "umeml public + heads", "umeml public + decoder", "linear", "linear public")
MAX_PATCHES = 64  # synthetic bags cut to 64 patches (the demo uses 256): a shared 2-core machine
PUBLIC_STAIN = 1.2  # the public synthetic sites' stain shift (private and held out: the demo's 0.4)
REFERENCE, PUBLIC_ALONE = "reference (non-DP federated)", "public alone"
PUBLIC_LINEAR = "public alone (linear)"  # the linear model trained centrally on the public sites
FEDERATION_KEYS = frozenset({"server_momentum", "preprocessing_source", "strategy", "lr_schedule", "warmup_rounds"})
# model settings under tuning: they reach the public checkpoints too (same architecture)
MODEL_KEYS = frozenset({"survival_head", "linear_rank"})


@dataclasses.dataclass
class World:
    """One benchmark world: cohort, site roles and the configs of its rows."""

    name: str
    cohort: object
    source: object
    public: tuple[str, ...]
    private: tuple[str, ...]
    held: tuple[str, ...]
    recipe: object  # the DP recipe's experiment (DP on; variant_config turns it off for inf rows)
    reference: object  # the non-DP federated reference
    public_train: object  # central training of the public checkpoint


def _load(name: str):
    from umeml.config import load_config

    return load_config(REPO / "configs" / name)


def _small(cfg):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_patches=MAX_PATCHES),
                               train=dataclasses.replace(cfg.train, bootstrap=200))


def _roles(cfg, private, held, rounds: int | None = None):
    fed = dataclasses.replace(cfg.federation, train_sites=tuple(private), personalise_epochs=0,
                              init_checkpoint=None, rounds=rounds or cfg.federation.rounds)
    fed = dataclasses.replace(fed, evaluate_every=fed.rounds)
    return dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, test_sites=tuple(held)), federation=fed)


def synthetic_data(work: Path, public: tuple[str, ...]) -> Path:
    """The 7-site world with the demo's stain, whose public sites' bags are replaced by the same
    bags generated with the public stain shift (same seed: same patients, labels and genomics)."""
    import shutil

    from umeml.data.synth import SynthSpec, generate

    data, stained = work / "synth7", work / "synth7-public-stain"
    if (data / "table.csv").is_file():
        return data
    generate(SynthSpec(sites=7, patients=60, seed=0), data, overwrite=True)
    generate(SynthSpec(sites=7, patients=60, seed=0, stain_shift=PUBLIC_STAIN), stained, overwrite=True)
    if (data / "table.csv").read_bytes() != (stained / "table.csv").read_bytes():
        raise RuntimeError("the stain shift changed the synthetic table: the public sites would be other patients")
    for bag in (stained / "bags").iterdir():
        if bag.name.split("-")[1] in public:
            shutil.copyfile(bag, data / "bags" / bag.name)
    shutil.rmtree(stained)
    return data


def synthetic_world(work: Path) -> World:
    """The synthetic world of the module docstring (generated under ``work`` once)."""
    from umeml.data.cohort import load_data_dir
    from umeml.data.source import CohortSource
    from umeml.server.public_init import public_training_config

    public, private, held = ("A4", "A5", "A6"), ("A0", "A1", "A2"), ("A3",)
    recipe = _roles(_small(_load("demo_dp.yaml")), private, held)
    data = synthetic_data(work, public)
    demo = _small(_load("demo.yaml"))
    # the public checkpoint is trained as `umeml-server simulate` trains it for configs/demo_dp.yaml:
    # its data (the patch-feature standardisation), model and train sections
    public_train = public_training_config(recipe, public)
    return World("synthetic", load_data_dir(data, recipe.data), CohortSource(data_dir=str(data)), public, private,
                 held, recipe, _roles(demo, private, held), public_train)


def gbmlgg_recipe(fed_cfg, private, held):
    """configs/gbmlgg_federated.yaml's model with configs/demo_dp.yaml's DP recipe and budget."""
    dp = _load("demo_dp.yaml").federation
    fed = dataclasses.replace(fed_cfg.federation, strategy=dp.strategy, server_momentum=dp.server_momentum,
                              lr_schedule="constant", warmup_rounds=0, selection="last",
                              local_dp=dp.local_dp, dp_recipe=dp.dp_recipe)
    cfg = dataclasses.replace(fed_cfg, name="gbmlgg_dp", federation=fed,
                              train=dataclasses.replace(fed_cfg.train, trainable="decoder"))
    return _roles(cfg, private, held, rounds=dp.rounds)


def gbmlgg_world(work: Path) -> World:
    """TCGA GBM-LGG genomics with public / private / held-out TSS sites (module docstring)."""
    from umeml.data.cohort import load_cohort
    from umeml.data.source import CohortSource

    split_cfg, fed_cfg = _load("gbmlgg_genomics.yaml"), _load("gbmlgg_federated.yaml")
    held, private = tuple(split_cfg.split.test_sites), tuple(split_cfg.federation.train_sites)
    table, sig = TCGA / "tcga_gbmlgg_all_clean.csv.gz", TCGA / "signatures.csv"
    cohort = load_cohort(table, sig, None, fed_cfg.data)
    public = tuple(s for s in cohort.sites if s not in held and s not in private)
    return World("gbmlgg", cohort, CohortSource(table=str(table), signatures=str(sig)), public, private, held,
                 gbmlgg_recipe(fed_cfg, private, held), _roles(fed_cfg, private, held), fed_cfg)


WORLDS = {"synthetic": synthetic_world, "gbmlgg": gbmlgg_world}


def public_of(variant: str) -> str:
    """The public-alone row a variant starts from (and is compared with)."""
    return PUBLIC_LINEAR if variant == "linear public" else PUBLIC_ALONE


def model_overrides(overrides: dict | None) -> dict:
    """The :data:`MODEL_KEYS` of a set of overrides (what a public checkpoint must be trained with)."""
    return {k: v for k, v in (overrides or {}).items() if k in MODEL_KEYS}


def public_checkpoint(world: World, seed: int, work: Path, model: str = "umeml",
                      model_overrides: dict | None = None) -> tuple[Path, dict]:
    """``model`` (UMEML or linear) trained centrally on the public sites; its best checkpoint and
    held-out metrics. ``model_overrides`` (:data:`MODEL_KEYS`) change its architecture, and its
    run directory's name with them."""
    from umeml.data.splits import make_split
    from umeml.rundir import read_final
    from umeml.train.central import train_central

    tag = "".join(f"-{k}-{v}" for k, v in sorted((model_overrides or {}).items()))
    out = work / ((f"{world.name}-public-{seed}" if model == "umeml" else f"{world.name}-public-{model}-{seed}") + tag)
    if (out / "final.json").is_file():  # trained by an earlier process on the same work dir
        return out / "checkpoints" / "best.pt", read_final(out / "final.json").to_json()["test"]
    base = world.public_train
    cfg = dataclasses.replace(base, seed=seed, name="public",
                              model=dataclasses.replace(base.model, name=model, **(model_overrides or {})),
                              split=dataclasses.replace(base.split, test_sites=world.held))
    split = make_split(world.cohort, world.held, 1, cfg.split.val_fraction, seed, world.public)
    final = train_central(cfg, world.cohort, out, split=split, progress=False)
    return out / "checkpoints" / "best.pt", final["test"]


def variant_config(world: World, variant: str, eps: float, seed: int, public: Path, overrides: dict | None = None):
    """The experiment of one row: the world's recipe, the variant's model / initialisation /
    trainable part, DP at ``eps`` or (inf) the identical run without DP; ``overrides``: recipe
    settings under tuning (``rounds``, ``trainable``, ``survival_alpha``, ``max_grad_norm``, the federation keys of
    :data:`FEDERATION_KEYS`, the model keys of :data:`MODEL_KEYS` and any ``dp_recipe`` key)."""
    from umeml.server.cli import with_local_dp

    base = world.recipe
    train, model, fed = base.train, base.model, base.federation
    if variant in ("umeml all", "linear", "linear public"):  # everything trains (the recipe file says decoder)
        train = dataclasses.replace(train, trainable="all")
        model = dataclasses.replace(model, name="linear") if variant.startswith("linear") else model
        if variant == "linear public":  # from the linear model trained on the public sites
            fed = dataclasses.replace(fed, init_checkpoint=str(public))
    else:
        fed = dataclasses.replace(fed, init_checkpoint=str(public))
        train = dataclasses.replace(train, trainable=variant.rsplit(" ", 1)[1])
    over = dict(overrides or {})
    if "trainable" in over and (variant.startswith("umeml public") or variant == "linear public"):
        train = dataclasses.replace(train, trainable=over.pop("trainable"))
    over.pop("trainable", None)
    if "rounds" in over:
        fed = dataclasses.replace(fed, rounds=over["rounds"], evaluate_every=over.pop("rounds"))
    for key in MODEL_KEYS & set(over):  # the public checkpoint was trained with them (run_grid)
        model = dataclasses.replace(model, **{key: over.pop(key)})
    for key in FEDERATION_KEYS & set(over):  # federation settings under tuning (not the recipe's own)
        fed = dataclasses.replace(fed, **{key: over.pop(key)})
    if "survival_alpha" in over:
        base = dataclasses.replace(base, survival=dataclasses.replace(base.survival, alpha=over.pop("survival_alpha")))
    fed = recorded_release_rule(fed, eps)
    if "max_grad_norm" in over:  # the per-patient clipping norm of local DP-SGD
        fed = dataclasses.replace(fed, local_dp=dataclasses.replace(fed.local_dp, max_grad_norm=over.pop("max_grad_norm")))
    fed = dataclasses.replace(fed, dp_recipe=dataclasses.replace(fed.dp_recipe, **over))
    if math.isinf(eps):  # the same run without DP: the recipe's optimizer, batches and steps, no clip, no noise
        fed = dataclasses.replace(fed, local_dp=dataclasses.replace(fed.local_dp, enabled=False),
                                  dp_recipe=dataclasses.replace(fed.dp_recipe, apply_without_dp=True))
    tag = "".join(c for c in json.dumps(overrides, sort_keys=True) if c.isalnum()) if overrides else ""
    cfg = dataclasses.replace(base, seed=seed, model=model, train=train, federation=fed,  # one run dir per overrides
                              name=f"{world.name}-{variant.replace(' ', '-').replace('+', '')}-{eps:g}-{seed}"
                              + (f"-{tag}" if tag else ""))
    return cfg if math.isinf(eps) else with_local_dp(cfg, eps)


def recorded_release_rule(fed, eps: float):
    """The release epsilons every recorded recipe figure ran with, pinned (the shipped "auto" rule
    scales them with the target instead): 1 / 1.5 / 0.5, or a fifth of the budget each where those
    would take all of it (a site refuses that)."""
    fixed = {"survival_hist": 1.0, "class_counts": 1.5, "genomic": 0.5}
    sp = fed.stats_privacy
    values = {"survival_hist": fed.survival_hist_epsilon, "class_counts": sp.class_counts_epsilon,
              "genomic": sp.genomic_epsilon}
    values = {k: fixed[k] if v == "auto" else v for k, v in values.items()}
    if not math.isinf(eps) and sum(v for v in values.values() if v is not None) >= eps:
        values = dict.fromkeys(values, eps / 5)
    return dataclasses.replace(fed, survival_hist_epsilon=values["survival_hist"], stats_privacy=dataclasses.replace(
        sp, class_counts_epsilon=values["class_counts"], genomic_epsilon=values["genomic"]))


def metrics_row(metrics: dict | None) -> dict:
    """``{task_metric: (value, ci_low, ci_high)}`` of the primary metrics (None where absent)."""
    out = {}
    for task, key in PRIMARY:
        m = metric_entry(metrics or {}, task, key)
        out[f"{task}_{key}"] = None if m is None else (m["value"], m.get("ci_low"), m.get("ci_high"))
    return out


def validation_row(run_dir: Path) -> dict:
    """The primary metrics on the training sites' validation splits at the last evaluated round,
    averaged over the sites (what tuning may look at; the held-out sites stay unseen)."""
    from umeml.rundir import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.csv") if r.kind == "validation" and r.value is not None]
    if not rows:
        return {}
    last = max(r.step for r in rows)
    out = {}
    for task, key in PRIMARY:
        vals = [r.value for r in rows if r.step == last and r.task == task and r.metric == key]
        out[f"val_{task}_{key}"] = float(np.mean(vals)) if vals else None
    return out


def run_one(world: World, cfg, variant: str, eps: float, seed: int, work: Path) -> dict:
    """One federation in this process: its held-out and validation metrics, spent epsilon, load."""
    from bench._inprocess import federate

    t0 = time.perf_counter()
    final = federate(cfg, world.cohort, world.source, work / cfg.name, held_out=world.held)
    ledger = final.get("privacy") or {}
    return {"world": world.name, "variant": variant, "epsilon": eps, "seed": seed,
            "spent": ledger.get("local_max_epsilon"), "wall_s": round(time.perf_counter() - t0, 1),
            "load": os.getloadavg()[0], **metrics_row(final.get("pooled") or final.get("held_out_combined")),
            **validation_row(work / cfg.name)}


def run_grid(world: World, epsilons, seeds, work: Path, variants=VARIANTS, reference: bool = True,
             overrides: dict | None = None, log=print) -> list[dict]:
    """Every row of one world's grid (public alone, reference, variants x epsilons), logged as it comes."""
    rows = []
    for seed in seeds:
        publics = {}
        for row, model in ((PUBLIC_ALONE, "umeml"), (PUBLIC_LINEAR, "linear")):
            if row == PUBLIC_LINEAR and "linear public" not in variants:
                continue
            t0 = time.perf_counter()
            publics[row], test = public_checkpoint(world, seed, work, model, model_overrides(overrides))
            rows.append({"world": world.name, "variant": row, "epsilon": None, "seed": seed, "spent": None,
                         "wall_s": round(time.perf_counter() - t0, 1), "load": os.getloadavg()[0], **metrics_row(test)})
            log(rows[-1])
        if reference:
            ref = dataclasses.replace(world.reference, seed=seed, name=f"{world.name}-reference-{seed}")
            rows.append(run_one(world, ref, REFERENCE, math.inf, seed, work))
            log(rows[-1])
        for eps in epsilons:
            for variant in variants:
                cfg = variant_config(world, variant, eps, seed, publics[public_of(variant)], overrides)
                rows.append(run_one(world, cfg, variant, eps, seed, work))
                log(rows[-1])
    return rows


def read_rows(log: Path) -> list[dict]:
    """The row dicts a run printed as JSON lines (``{"world": ...}``) in its log."""
    return [json.loads(line) for line in Path(log).read_text().splitlines() if line.startswith('{"world"')]


# ------------------------------------------------------------------ summaries
METRIC_KEYS = tuple(f"{t}_{k}" for t, k in PRIMARY)
GOALS = {"synthetic": {8.0: 0.03, 4.0: 0.06}, "gbmlgg": {8.0: 0.05, 4.0: 0.06}}  # largest allowed loss vs the reference


def _eps_label(eps) -> str:
    return "-" if eps is None else ("inf (no DP)" if math.isinf(eps) else f"{eps:g}")


def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v is None else v[0]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sd (ddof 1) over seeds for each (world, variant, epsilon), with the load range."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["world"], r["variant"], r["epsilon"]), []).append(r)
    out = []
    for (world, variant, eps), rs in groups.items():
        s = {"world": world, "variant": variant, "epsilon": eps, "seeds": sorted(r["seed"] for r in rs),
             "spent": max((r["spent"] for r in rs if r["spent"] is not None), default=None),
             "wall_s": float(np.mean([r["wall_s"] for r in rs])),
             "load": (min(r["load"] for r in rs), max(r["load"] for r in rs))}
        for key in METRIC_KEYS:
            vals = [v for v in (_value(r, key) for r in rs) if v is not None]
            s[key] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0) if vals else None
        out.append(s)
    order = {v: i for i, v in enumerate((PUBLIC_ALONE, PUBLIC_LINEAR, REFERENCE, *VARIANTS))}
    return sorted(out, key=lambda s: (s["world"], order.get(s["variant"], 99),
                                      -(math.inf if s["epsilon"] is None else s["epsilon"])))


def format_summary(s: dict) -> str:
    """A markdown row: world, row, epsilon, spent, seeds, the metrics as mean ± sd, wall, load."""
    spent = "-" if s["spent"] is None else f"{s['spent']:.2f}"
    cells = ["-" if s[k] is None else f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in METRIC_KEYS]
    return (f"| {s['world']} | {s['variant']} | {_eps_label(s['epsilon'])} | {spent} | {len(s['seeds'])} | "
            + " | ".join(cells) + f" | {s['wall_s']:.0f} s | {s['load'][0]:.1f}-{s['load'][1]:.1f} |")


def _by_seed(rows: list[dict], world: str, variant: str, eps) -> dict[int, dict]:
    return {r["seed"]: r for r in rows if r["world"] == world and r["variant"] == variant and r["epsilon"] == eps}


def paired(rows: list[dict], world: str, a: tuple[str, float], b: tuple[str, float | None]) -> dict | None:
    """Per-seed differences a - b (seeds both have) per metric: ``{key: (mean, sd, [diffs])}``."""
    xa, xb = _by_seed(rows, world, *a), _by_seed(rows, world, *b)
    seeds = sorted(set(xa) & set(xb))
    if not seeds:
        return None
    out: dict = {"seeds": seeds}
    for key in METRIC_KEYS:
        d = [_value(xa[s], key) - _value(xb[s], key) for s in seeds
             if _value(xa[s], key) is not None and _value(xb[s], key) is not None]
        out[key] = (float(np.mean(d)), float(np.std(d, ddof=1)) if len(d) > 1 else 0.0, d) if d else None
    return out


def paired_rows(rows: list[dict]) -> list[str]:
    """Markdown rows: every DP row minus its no-DP twin, minus the reference and (public rows)
    minus the public checkpoint alone; mean ± sd of the per-seed differences."""
    lines = []
    keys = sorted({(r["world"], r["variant"], r["epsilon"]) for r in rows
                   if r["variant"] in VARIANTS and not math.isinf(r["epsilon"])},
                  key=lambda k: (k[0], VARIANTS.index(k[1]), -k[2]))
    for world, variant, eps in keys:
        against = [("its no-DP twin", (variant, math.inf)), ("reference", (REFERENCE, math.inf))]
        if "public" in variant:
            against.append((public_of(variant), (public_of(variant), None)))
        for label, b in against:
            d = paired(rows, world, (variant, eps), b)
            if d is None:
                continue
            cells = ["-" if d[k] is None else f"{d[k][0]:+.3f} ± {d[k][1]:.3f}" for k in METRIC_KEYS]
            lines.append(f"| {world} | {variant} | {eps:g} | {label} | {len(d['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def ci_rows(rows: list[dict], eps: float = 1.0) -> list[str]:
    """Markdown rows: each seed's held-out value and bootstrap 95% CI at ``eps`` (vs chance 0.5)."""
    lines = []
    for r in sorted((r for r in rows if r["epsilon"] == eps), key=lambda r: (r["world"], r["variant"], r["seed"])):
        cells = []
        for key in METRIC_KEYS:
            v = r.get(key)
            cells.append("-" if v is None or v[1] is None else
                         f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]{' above chance' if v[1] > 0.5 else ''}")
        lines.append(f"| {r['world']} | {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    return lines


def goal_lines(rows: list[dict], variant: str) -> list[str]:
    """The issue's goals for one row kind (the recipe), met or not, with the numbers."""
    lines = []
    for world in sorted({r["world"] for r in rows}):
        for eps, allowed in GOALS.get(world, {}).items():
            d = paired(rows, world, (variant, eps), (REFERENCE, math.inf))
            if d is None:
                lines.append(f"- {world}, epsilon {eps:g} vs reference: not measured")
                continue
            worst = min(d[k][0] for k in METRIC_KEYS if d[k] is not None)
            lines.append(f"- {world}, {variant}, epsilon {eps:g} minus reference (mean over {len(d['seeds'])} seeds): "
                         + " / ".join(f"{d[k][0]:+.3f}" for k in METRIC_KEYS if d[k] is not None)
                         + f"; goal >= -{allowed:g}: **{'met' if worst >= -allowed else 'not met'}**")
        d = paired(rows, world, (variant, 8.0), (public_of(variant), None)) if "public" in variant else None
        if d is not None:
            beats = [d[k][0] > max(d[k][1], 0.0) for k in METRIC_KEYS if d[k] is not None]
            lines.append(f"- {world}, {variant}, epsilon 8 minus {public_of(variant)}: "
                         + " / ".join(f"{d[k][0]:+.3f} ± {d[k][1]:.3f}" for k in METRIC_KEYS if d[k] is not None)
                         + f"; beats it by more than the seed spread on {sum(beats)} of {len(beats)} metrics: "
                         + f"**{'met' if all(beats) else 'not met'}**")
        ones = _by_seed(rows, world, variant, 1.0)
        if ones:
            above = [r[k][1] is not None and r[k][1] > 0.5 for r in ones.values() for k in METRIC_KEYS if r.get(k)]
            lines.append(f"- {world}, {variant}, epsilon 1: bootstrap 95% CI above chance (0.5) in {sum(above)} of "
                         f"{len(above)} seed x metric cells: **{'met' if above and all(above) else 'not met'}**")
    return lines


def read_tune_rows(log: Path) -> list[dict]:
    """The rows a ``--tune`` run printed (``{"tune": ...}`` JSON lines)."""
    return [json.loads(line) for line in Path(log).read_text().splitlines() if line.startswith('{"tune"')]


def tune_table(rows: list[dict]) -> list[str]:
    """Markdown rows of a tuning pass: validation metrics (mean over seeds) per candidate, best first."""
    groups: dict = {}
    for r in rows:
        world = r["world"] + (f" (epsilon {r['epsilon']:g})" if "epsilon" in r else "")  # else at 8
        groups.setdefault((world, r["variant"], json.dumps(r["tune"])), []).append(r)
    keys = [f"val_{k}" for k in METRIC_KEYS]
    out = []
    for (world, variant, tune), rs in groups.items():
        means = [float(np.mean([r[k] for r in rs if r.get(k) is not None])) for k in keys]
        loads = [r["load"] for r in rs]
        out.append((-float(np.mean(means)), f"| {world} | {variant} | `{tune}` | {len(rs)} | "
                    + " | ".join(f"{m:.3f}" for m in means) + f" | {np.mean(means):.3f} | "
                    f"{min(loads):.1f}-{max(loads):.1f} |"))
    return [line for _, line in sorted(out)]


def unique_rows(rows: list[dict]) -> list[dict]:
    """The first row of each (world, variant, epsilon, seed): processes that share a work dir
    each log the cached public checkpoint's row again."""
    seen, out = set(), []
    for r in rows:
        key = (r["world"], r["variant"], r["epsilon"], r["seed"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ------------------------------------------------------------------ one setting against another
BEFORE = " [before]"


def without_dp(row: dict) -> bool:
    """Whether a row ran without DP (public alone, the reference, a no-DP twin): such a row does not
    depend on a DP setting, so two grids that differ in one may share it."""
    return row["epsilon"] is None or math.isinf(row["epsilon"])


def with_shared_rows(grid: list[dict], other: list[dict]) -> list[dict]:
    """``grid`` plus the rows of ``other`` that ran without DP (:func:`without_dp`) where ``grid``
    has none of its own: a grid run with ``--no-reference`` is measured against the other's reference."""
    return unique_rows(grid + [r for r in other if without_dp(r)])


def versus_rows(after: list[dict], before: list[dict]) -> list[str]:
    """Markdown rows: each DP row of ``after`` minus the same row (world, variant, epsilon, seed)
    of ``before`` (the same grid under the other setting), mean ± sd of the per-seed differences."""
    rows = after + [{**r, "variant": r["variant"] + BEFORE} for r in before]
    keys = sorted({(r["world"], r["variant"], r["epsilon"]) for r in after
                   if r["variant"] in VARIANTS and r["epsilon"] is not None and not math.isinf(r["epsilon"])},
                  key=lambda k: (k[0], VARIANTS.index(k[1]), -k[2]))
    lines = []
    for world, variant, eps in keys:
        d = paired(rows, world, (variant, eps), (variant + BEFORE, eps))
        if d is None:
            continue
        cells = ["-" if d[k] is None else f"{d[k][0]:+.3f} ± {d[k][1]:.3f}" for k in METRIC_KEYS]
        lines.append(f"| {world} | {variant} | {eps:g} | {len(d['seeds'])} | " + " | ".join(cells) + " |")
    return lines

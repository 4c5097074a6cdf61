"""UMEML vs the baselines on the synthetic cohort, centralized, over several seeds, next to the oracle.

    python -m bench.bench_synthetic [--seeds 0 1 2] [--models umeml abmil snn late_fusion]
                                    [--ablations] [--federated] [--epochs N] [--cache runs.jsonl]
                                    [--write docs/benchmarks.md]

Each seed generates its own demo-sized cohort (4 sites x 60 patients) and trains every model
with configs/demo.yaml (only the model name, or an ablation switch, changes), testing on the
same held-out site (chosen by the seed, 60 patients).

- ``--ablations`` adds UMEML with one component switched off: ``model.use_modularity=false``,
  ``use_registers=false``, ``use_cross_attention=false`` (mean pooling instead), the single
  modalities ``modalities=[pathology]`` / ``[genomics]``, and mean pooling on pathology alone.
- ``--ablations modularity cross-attention`` runs only the named ones (keys of ``ABLATION_KEYS``);
  ``spatial``, ``spatial-pathology`` and ``spatial-mean`` add UMEML with ``model.spatial_context:
  neighbours`` (multimodal, pathology alone, and with mean pooling); such a run writes its own
  ``### Spatial context ...`` subsection of the clustered section and reports the paired
  differences of ``SPATIAL_PAIRS`` (the goal pair, ``SPATIAL_GOAL``: ``umeml +spatial`` against
  ``umeml +spatial -cross-attention``, the mean pooling that sees the same neighbourhoods).
- ``--clustered [mosaic|foci|arrangement]`` generates the cohorts with spatially clustered morphotypes
  (``SynthSpec.clustered``; ``clustered_variant`` "mosaic", the default, a tumour/background
  mosaic, "foci", a biopsy with 2-10% tumour in compact foci and necrotic cores in grade IV, or
  "arrangement", 20-50% tumour whose layout alone (scattered / masses / necrotic masses) is the grade;
  ``umeml/data/synth.py``) and writes its own section, which also states the goal "UMEML > mean
  pooling (``-cross-attention``) by more than the seed sd". With ``--epochs N`` the figures go
  to that section's own ``### Training budget --epochs N`` subsection; other subsections (the
  ``### Previous generator`` figures) are kept across rewrites.
- ``--federated`` adds UMEML trained by FedAvg in Flower's simulation engine (``simulate()``,
  demo.yaml's ``federation`` section: 3 training sites, 8 rounds x 2 local epochs) and evaluated
  on the same held-out site as the centralized runs.

The table gives mean (sd) over seeds per task and the ratio of each model's mean to the oracle's
mean (``oracle.json``: a logistic regression on the generator's latent variables, leave-one-site-out
over the whole cohort, and the c-index of the true hazard).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._harness import PRIMARY, REPO, pick, stamp, write_section
from umeml.data.synth import CLUSTERED_VARIANTS

TITLE = "## UMEML, ablations and baselines on the synthetic cohort, next to the oracle"
TITLE_CLUSTERED = "## Synthetic cohort with spatially clustered morphotypes: UMEML vs mean pooling"
METRICS = PRIMARY
GOAL = 0.95  # UMEML's target share of the oracle's metric

# name -> (registry model, ModelConfig overrides)
ABLATIONS = {
    "umeml -modularity": ("umeml", {"use_modularity": False}),
    "umeml -registers": ("umeml", {"use_registers": False}),
    "umeml -cross-attention": ("umeml", {"use_cross_attention": False}),
    "umeml pathology only": ("umeml", {"modalities": ("pathology",)}),
    "umeml genomics only": ("umeml", {"modalities": ("genomics",)}),
    # the pooling question without the genomic signal both variants share
    "umeml -cross-attention pathology only": ("umeml", {"use_cross_attention": False, "modalities": ("pathology",)}),
    # spatial context from the bags' coords (model.spatial_context, umeml/model/spatial.py)
    "umeml +spatial": ("umeml", {"spatial_context": "neighbours"}),
    "umeml +spatial pathology only": ("umeml", {"spatial_context": "neighbours", "modalities": ("pathology",)}),
    "umeml +spatial -cross-attention": ("umeml", {"spatial_context": "neighbours", "use_cross_attention": False}),
}
ABLATION_KEYS = {"modularity": "umeml -modularity", "registers": "umeml -registers",
                 "cross-attention": "umeml -cross-attention", "pathology": "umeml pathology only",
                 "genomics": "umeml genomics only", "pathology-mean": "umeml -cross-attention pathology only",
                 "spatial": "umeml +spatial", "spatial-pathology": "umeml +spatial pathology only",
                 "spatial-mean": "umeml +spatial -cross-attention"}
MEAN_POOLING = "umeml -cross-attention"
SPATIAL = "umeml +spatial"
# With spatial context the goal's pair is the one whose two models see the same inputs (the
# neighbourhoods), so that only the pooling differs; `+spatial` against plain mean pooling also
# changes the input and is reported beside it, not as the goal.
SPATIAL_GOAL = (SPATIAL, "umeml +spatial -cross-attention")
# (model, baseline) pairs whose paired differences a spatial-context run reports
SPATIAL_PAIRS = (SPATIAL_GOAL, (SPATIAL, MEAN_POOLING), (SPATIAL, "umeml"),
                 ("umeml +spatial pathology only", "umeml -cross-attention pathology only"),
                 ("umeml +spatial pathology only", "umeml pathology only"),
                 ("umeml +spatial -cross-attention", MEAN_POOLING))
FEDERATED = "umeml federated (FedAvg)"
SITE_ORACLE = "oracle, held-out site"


def site_oracle(latents: list[dict], held: tuple[str, ...], seed: int) -> dict:
    """The oracle restricted to the held-out site(s): the same logistic regression on the latent
    variables, fitted on the other sites (its leave-one-site-out fold), scored with umeml's own
    metrics on exactly the patients the models are tested on."""
    from sklearn.linear_model import LogisticRegression

    from umeml.data.synth import oracle_features
    from umeml.metrics.classification import auc_macro_ovr
    from umeml.metrics.survival import concordance_index

    x = np.array([oracle_features(lat) for lat in latents])
    test = np.array([lat["site"] in held for lat in latents])
    grades = ("II", "III", "IV")
    targets = {"grade": np.array([grades.index(lat["grade"]) for lat in latents]),
               "subtype": np.array([lat["subtype"] for lat in latents])}
    out = {}
    for task, y in targets.items():
        clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(x[~test], y[~test])
        probs = np.zeros((int(test.sum()), int(y.max()) + 1))
        probs[:, clf.classes_] = clf.predict_proba(x[test])
        out[task] = auc_macro_ovr(y[test], probs)[0]
    lat_test = [lat for lat, t in zip(latents, test) if t]
    out["survival"] = concordance_index(np.array([lat["months"] for lat in lat_test]),
                                        np.array([lat["censored"] for lat in lat_test]),
                                        np.array([lat["log_hazard"] for lat in lat_test]))
    return out


def _generate(spec, data: Path) -> list[dict]:
    """``generate`` the cohort and return the generator's latent variables (captured on their
    way to ``oracle_metrics``; synth.py itself is unchanged)."""
    from umeml.data import synth

    captured: list = []
    original = synth.oracle_metrics

    def spy(latents, seed):
        captured.extend(latents)
        return original(latents, seed=seed)

    synth.oracle_metrics = spy
    try:
        synth.generate(spec, data)
    finally:
        synth.oracle_metrics = original
    return captured


def _cache_key(clustered: str | None):
    """A run's cohort in the cache: False (default), True (clustered mosaic, as first written), else the variant."""
    return {None: False, "mosaic": True}.get(clustered, clustered)


def _load_cache(path: Path | None, epochs, clustered: str | None = None, tumour_fraction=None) -> dict:
    """{(seed, variant): {"metrics", "seconds"}} from a JSON-lines cache (runs of this script)."""
    fraction = list(tumour_fraction) if tumour_fraction else None
    done: dict = {}
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if (r.get("epochs") == epochs and r.get("clustered", False) == _cache_key(clustered)
                        and r.get("tumour_fraction") == fraction):
                    done[(r["seed"], r["variant"])] = r
    return done


@dataclasses.dataclass
class _Runs:
    """What the runs of one benchmark share: results so far, the cache, the current seed's cohort."""

    base: object  # ExperimentConfig of configs/demo.yaml (epochs overridden)
    out: dict  # variant -> seed -> metrics
    seconds: dict  # variant -> wall seconds per run
    done: dict  # cached runs: (seed, variant) -> record
    cache: Path | None
    epochs: int | None
    log: object
    tmp: Path
    cohort: object = None
    held: tuple = ()
    clustered: str | None = None  # None, or the clustered variant ("mosaic", "foci", "arrangement")
    cached: int = 0  # runs taken from the cache, not run by this invocation
    tumour_fraction: tuple | None = None  # SynthSpec.tumour_fraction (clustered only)


def _record(ctx: "_Runs", seed: int, name: str, metrics: dict, secs: float) -> None:
    """Append one finished run to the JSON-lines cache."""
    if ctx.cache is not None:
        with ctx.cache.open("a") as f:
            f.write(json.dumps({"seed": seed, "variant": name, "epochs": ctx.epochs, "metrics": metrics,
                                "seconds": secs, **({"clustered": _cache_key(ctx.clustered)} if ctx.clustered else {}),
                                **({"tumour_fraction": list(ctx.tumour_fraction)} if ctx.tumour_fraction else {})})
                    + "\n")


def _show(metrics: dict) -> str:
    return "  ".join(f"{t} {v:.3f}" if v is not None else f"{t} -" for t, v in metrics.items())


def _central(ctx: _Runs, seed: int, name: str, model: str, overrides: dict) -> None:
    """One centralized run of a variant on this seed's cohort (or its cached result)."""
    from umeml.train.central import train_central

    out, seconds, held = ctx.out, ctx.seconds, ctx.held
    if (seed, name) in ctx.done:
        out[name][seed] = ctx.done[(seed, name)]["metrics"]
        seconds[name].append(ctx.done[(seed, name)]["seconds"])
        ctx.log(f"seed {seed} {name:24s} (cached)")
        ctx.cached += 1
        return
    base = ctx.base
    cfg = dataclasses.replace(base, seed=seed, model=dataclasses.replace(base.model, name=model, **overrides))
    t0 = time.perf_counter()
    final = train_central(cfg, ctx.cohort, ctx.tmp / f"run-{seed}-{len(seconds[name])}-{model}", progress=False)
    seconds[name].append(time.perf_counter() - t0)
    out[name][seed] = pick(final["test"], METRICS)
    _record(ctx, seed, name, out[name][seed], seconds[name][-1])
    ctx.log(f"seed {seed} held-out {','.join(held)} {name:24s} {_show(out[name][seed])}  ({seconds[name][-1]:.0f} s)")


def _federated(ctx: _Runs, seed: int, data: Path) -> None:
    """UMEML by FedAvg in the simulation engine on this seed's cohort (or its cached result)."""
    from umeml.data.source import CohortSource
    from umeml.simulation import simulate

    out, seconds = ctx.out, ctx.seconds
    if (seed, FEDERATED) in ctx.done:
        out[FEDERATED][seed] = ctx.done[(seed, FEDERATED)]["metrics"]
        seconds[FEDERATED].append(ctx.done[(seed, FEDERATED)]["seconds"])
        ctx.log(f"seed {seed} {FEDERATED:24s} (cached)")
        ctx.cached += 1
        return
    cfg = dataclasses.replace(ctx.base, seed=seed)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        final = simulate(cfg, ctx.cohort, CohortSource(data_dir=str(data)), ctx.tmp / f"fed-{seed}",
                         held_out=ctx.held)
    seconds[FEDERATED].append(time.perf_counter() - t0)
    out[FEDERATED][seed] = pick(final.get("pooled") or final["held_out_combined"], METRICS)
    _record(ctx, seed, FEDERATED, out[FEDERATED][seed], seconds[FEDERATED][-1])
    ctx.log(f"seed {seed} held-out {','.join(final['held_out_sites'])} {FEDERATED:24s} "
               f"{_show(out[FEDERATED][seed])}  ({seconds[FEDERATED][-1]:.0f} s, {final['rounds']} rounds)")


def _one_seed(ctx: _Runs, seed: int, variants: dict, federated: bool) -> None:
    """Generate this seed's cohort, score both oracles, then run every variant on it."""
    from umeml.data.cohort import load_data_dir
    from umeml.data.splits import choose_test_sites
    from umeml.data.synth import SynthSpec

    out, base = ctx.out, ctx.base
    data = ctx.tmp / f"seed{seed}"
    latents = _generate(SynthSpec(sites=4, patients=60, seed=seed, clustered=ctx.clustered is not None,
                                  clustered_variant=ctx.clustered or "mosaic",
                                  tumour_fraction=ctx.tumour_fraction), data)
    oracle = json.loads((data / "oracle.json").read_text())
    out["oracle"][seed] = {t: oracle[t].get("auc_macro", oracle[t].get("c_index")) for t, _ in METRICS}
    ctx.cohort = load_data_dir(data, base.data)
    ctx.held = held = choose_test_sites(ctx.cohort, base.split.n_test_sites, seed)
    out[SITE_ORACLE][seed] = site_oracle(latents, held, seed)
    ctx.log(f"seed {seed} held-out {','.join(held)} {'oracle.json / site oracle':24s} "
               + "  ".join(f"{t} {out['oracle'][seed][t]:.3f} / {out[SITE_ORACLE][seed][t]:.3f}" for t, _ in METRICS))
    for name, (model, overrides) in variants.items():
        _central(ctx, seed, name, model, overrides)
    if federated:
        _federated(ctx, seed, data)


def run(seeds, models, epochs=None, ablations=False, federated=False, log=print, cache: Path | None = None,
        clustered: str | None = None, tumour_fraction: tuple | None = None) -> dict:
    """Test metrics per model and seed, and the oracle's, as nested dicts (plus ``_seconds``).

    ``ablations``: True for all of them, or a list of ``ABLATION_KEYS`` keys. ``clustered``: None
    (the default cohort) or a ``SynthSpec.clustered_variant``, with its ``tumour_fraction``.

    With ``cache`` every finished run is appended to that JSON-lines file and runs already there
    (same seed, variant and ``epochs``) are not repeated, so an interrupted benchmark resumes.
    """
    from umeml.config import load_config

    base = load_config(REPO / "configs" / "demo.yaml")
    if epochs:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=epochs))
    variants = {m: (m, {}) for m in models}
    if ablations:
        names = list(ABLATIONS) if ablations is True else [ABLATION_KEYS[k] for k in ablations]
        variants.update({n: ABLATIONS[n] for n in names})
    out: dict = {m: {} for m in variants}
    if federated:
        out[FEDERATED] = {}
    out["oracle"] = {}
    out[SITE_ORACLE] = {}
    seconds: dict = {m: [] for m in out if not m.startswith("oracle")}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = _Runs(base, out, seconds, _load_cache(cache, epochs, clustered, tumour_fraction), cache, epochs, log,
                    Path(tmp), clustered=clustered, tumour_fraction=tumour_fraction)
        for seed in seeds:
            _one_seed(ctx, seed, variants, federated)
    out["_seconds"] = seconds
    out["_cached"] = ctx.cached
    return out


def _mean(per_seed: dict, task: str) -> float | None:
    vals = [v[task] for v in per_seed.values() if v.get(task) is not None]
    return float(np.mean(vals)) if vals else None


def table(results: dict) -> str:
    """Mean (sd) over seeds per model and task, the ratio to the oracle, and who wins."""
    results = {k: v for k, v in results.items() if not k.startswith("_")}
    oracle = {t: _mean(results["oracle"], t) for t, _ in METRICS}
    site = {t: _mean(results[SITE_ORACLE], t) for t, _ in METRICS} if SITE_ORACLE in results else None
    head = ("| model | " + " | ".join(f"{t} {k}" for t, k in METRICS) + " | "
            + " | ".join(f"{t} / oracle" + (" (json / site)" if site else "") for t, _ in METRICS) + " |")
    lines = [head, "| --- |" + " --- |" * (2 * len(METRICS))]
    for name, per_seed in results.items():
        cells, ratios = [], []
        for task, _ in METRICS:
            vals = np.array([v[task] for v in per_seed.values() if v.get(task) is not None])
            cells.append(f"{vals.mean():.3f} ({vals.std():.3f})" if len(vals) else "-")
            if not len(vals) or name.startswith("oracle"):
                ratios.append("-")
            else:
                ratios.append(f"{vals.mean() / oracle[task]:.2f}" + (f" / {vals.mean() / site[task]:.2f}" if site else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if "umeml" in results:
        baselines = [m for m in results if m in ("abmil", "snn", "late_fusion")]
        wins = []
        for task, _ in METRICS:
            mine = _mean(results["umeml"], task)
            others = [_mean(results[m], task) for m in baselines]
            others = [o for o in others if o is not None]
            ratio = mine / oracle[task]
            extra = f", {100 * mine / site[task]:.0f}% of the held-out-site oracle" if site else ""
            beats = f"beats all baselines {'yes' if mine > max(others) else 'no'}, " if others else ""
            wins.append(f"{task}: {beats}{100 * ratio:.0f}% of oracle.json{extra} (goal >= {100 * GOAL:.0f}%: "
                        f"{'met' if ratio >= GOAL else 'not met'})")
        lines.append("\nUMEML (centralized): " + "; ".join(wins))
        if FEDERATED in results:
            fed = [f"{t} {100 * _mean(results[FEDERATED], t) / oracle[t]:.0f}%"
                   + (f" ({100 * _mean(results[FEDERATED], t) / site[t]:.0f}% of site oracle)" if site else "")
                   for t, _ in METRICS if _mean(results[FEDERATED], t) is not None]
            lines.append("UMEML federated, share of oracle.json: " + ", ".join(fed))
    return "\n".join(lines)


def paired_gain(results: dict, model: str, baseline: str) -> list[str]:
    """Per task: ``model``'s mean minus ``baseline``'s over their common seeds, both models' seed
    sd and the sd of the paired per-seed differences; "met" when the gain exceeds both seed sds."""
    parts = []
    for task, _ in METRICS:
        seeds = [k for k, v in results[model].items()
                 if v.get(task) is not None and results[baseline].get(k, {}).get(task) is not None]
        if len(seeds) < 2:
            continue
        a = np.array([results[model][k][task] for k in seeds])
        b = np.array([results[baseline][k][task] for k in seeds])
        gain, sd = float(a.mean() - b.mean()), max(float(a.std()), float(b.std()))
        parts.append(f"{task}: {gain:+.3f} (seed sd {a.std():.3f} / {b.std():.3f}, paired sd {(a - b).std():.3f}, "
                     f"ahead in {int((a > b).sum())} of {len(seeds)} seeds; {'met' if gain > sd else 'not met'})")
    return parts


def pooling_goal(results: dict) -> str:
    """The clustered cohort's goal: UMEML's mean minus mean pooling's, per task, against the
    seed sd of both models (met when the gain exceeds both) and the sd of the paired gain; with
    the spatial-context variants, the same for each pair of ``SPATIAL_PAIRS`` present."""
    lines = []
    if "umeml" in results and MEAN_POOLING in results:
        lines.append("Goal UMEML > mean pooling by more than the seed sd: "
                     + "; ".join(paired_gain(results, "umeml", MEAN_POOLING)))
    for model, baseline in SPATIAL_PAIRS:
        if model in results and baseline in results:
            goal = "Goal " if (model, baseline) == SPATIAL_GOAL else ""
            lines.append(f"{goal}`{model}` - `{baseline}` (> the seed sd?): "
                         + "; ".join(paired_gain(results, model, baseline)))
    return "\n\n".join(lines)


COHORTS = {
    "mosaic": "Cohorts: `SynthSpec(sites=4, patients=60, seed=s, clustered=True)` (variant `mosaic`): each slide a "
              "mosaic of ~40-patch spatial regions, the tumour regions (5-40% of a slide, per patient) following the "
              "subtype's morphotype mixture, the rest four background morphotypes (`umeml/data/synth.py`).",
    "foci": "Cohorts: `SynthSpec(sites=4, patients=60, seed=s, clustered=True, clustered_variant=\"foci\")`: a "
            "biopsy-like slide, background a mosaic of ~40-patch regions of four background morphotypes in a "
            "patient-specific mixture; tumour 2-10% of the patches (per patient) in 1-3 compact foci, patch "
            "morphotypes from the subtype's mixture; in 80% of grade IV patients the central 30% of every focus "
            "is necrosis (a ninth tissue centroid, about 1% of the patches; `umeml/data/synth.py`). The oracle also "
            "sees whether necrosis is shown. *Mean pooling* = `umeml -cross-attention` (masked mean of the patch "
            "embeddings instead of prototype cross-attention; design 5).",
    "arrangement": "Cohorts: `SynthSpec(sites=4, patients=60, seed=s, clustered=True, clustered_variant="
                   "\"arrangement\")`: the grade lives in the tumour's layout only. Background as in `foci`; tumour "
                   "20-50% of the patches (per patient), morphotypes from ONE pan-glioma mixture shared by all subtypes "
                   "(the shares carry no label); grade II scattered over the slide, III the same share in 1-3 compact "
                   "masses, IV compact masses with a necrotic core (3-8% of the patches; a mean sees it too). Gene means "
                   "depend on the lineage only (astrocytic, oligoastrocytic, oligodendroglial), so the subtype needs both "
                   "modalities; II vs III is layout only. The oracle also sees the layout. *Mean pooling* = "
                   "`umeml -cross-attention`; with `+spatial` the same with `model.spatial_context: neighbours`.",
}
PREVIOUS = "### Previous generator"


def _subsections(path: Path) -> tuple[str, dict[str, str]]:
    """The clustered section of ``path`` as (its text before the first ``### `` heading, {heading
    line: that subsection's text}); empty when there is no such section."""
    text = path.read_text() if path.is_file() else ""
    start = text.find(TITLE_CLUSTERED)
    if start < 0:
        return "", {}
    end = text.find("\n## ", start + 1)
    lines = text[start:end if end >= 0 else len(text)].split("\n")[1:]
    main, subs, current = [], {}, None
    for line in lines:
        if line.startswith("### "):
            current = line
            subs[current] = []
        (subs[current] if current else main).append(line)
    return "\n".join(main).strip("\n"), {h: "\n".join(v).strip("\n") for h, v in subs.items()}


def _is_subsection(epochs: int | None, tumour_fraction: tuple | None, heading: str | None) -> bool:
    """Whether a clustered run writes a subsection (a budget, a tumour fraction or a named heading)
    rather than the section's main text (the demo budget and the variant's own fraction)."""
    return heading is not None or epochs is not None or bool(tumour_fraction)


def clustered_body(path: Path, body: str, epochs: int | None, tumour_fraction: tuple | None = None,
                   heading: str | None = None) -> str:
    """The clustered section's new text: a run at the demo budget and the variant's own tumour
    fraction replaces the main text; one with ``--epochs N`` its own ``### Training budget
    --epochs N`` subsection, one with ``--tumour-fraction`` its ``### Run with ...`` one; every
    other subsection is kept (the previous generator's last), so no earlier figure is overwritten.
    ``heading`` names the subsection outright (other benchmarks' figures in this section)."""
    main, subs = _subsections(path)
    if heading is not None:
        subs[heading] = heading + "\n\n" + body
    elif not _is_subsection(epochs, tumour_fraction, heading):
        main = body
    else:
        heading = (f"### Training budget --epochs {epochs}" if not tumour_fraction else
                   f"### Run with --tumour-fraction {tumour_fraction[0]:g} {tumour_fraction[1]:g}"
                   + (f" --epochs {epochs}" if epochs else ""))
        subs[heading] = heading + "\n\n" + body
    order = sorted(subs, key=lambda h: h.startswith(PREVIOUS))
    return "\n\n".join([main] * bool(main) + [subs[h] for h in order])


def write_clustered(path: Path, body: str, epochs: int | None, tumour_fraction: tuple | None,
                    heading: str | None, today: str | None = None) -> None:
    """Write a clustered run into its section of ``path`` (:func:`clustered_body`). A run that
    writes a subsection keeps the section's main text and so its date; the subsection's body
    says when it was run instead (``today``: :func:`stamp`)."""
    keep = _is_subsection(epochs, tumour_fraction, heading)
    if keep:
        body = f"Run {today or stamp()}. " + body
    write_section(path, TITLE_CLUSTERED, clustered_body(path, body, epochs, tumour_fraction, heading=heading),
                  keep_when=keep)


def spatial_heading(variant: str, results: dict, epochs: int | None, tumour_fraction: tuple | None) -> str | None:
    """A run with a spatial-context variant writes its own subsection (never the section's main
    text, whose figures predate the option), named by cohort variant, tumour fraction and budget."""
    if not any(name.startswith(SPATIAL) for name in results):
        return None
    return (f"### Spatial context (`model.spatial_context: neighbours`), {variant} cohort"
            + (f", --tumour-fraction {tumour_fraction[0]:g} {tumour_fraction[1]:g}" if tumour_fraction else "")
            + (f", --epochs {epochs}" if epochs else ""))


def _command(args, ap) -> str:
    cmd = "python -m bench.bench_synthetic --seeds " + " ".join(map(str, args.seeds))
    if args.models != ap.get_default("models"):
        cmd += " --models " + " ".join(args.models)
    if args.ablations is not None:
        cmd += " --ablations" + "".join(f" {a}" for a in args.ablations)
    cmd += " --federated" * args.federated + (f" --clustered {args.clustered}" if args.clustered else "")
    if args.tumour_fraction:
        cmd += " --tumour-fraction " + " ".join(f"{f:g}" for f in args.tumour_fraction)
    return cmd + (f" --epochs {args.epochs}" if args.epochs else "")


def main(argv=None) -> int:
    """Run, print the table, optionally write it as a section of a markdown file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["umeml", "abmil", "snn", "late_fusion"])
    ap.add_argument("--ablations", nargs="*", choices=sorted(ABLATION_KEYS),
                    help="add UMEML with one component switched off (all of them, or the ones named)")
    ap.add_argument("--federated", action="store_true", help="add UMEML trained by FedAvg (simulation)")
    ap.add_argument("--clustered", nargs="?", const="mosaic", choices=CLUSTERED_VARIANTS,
                    help="cohorts with spatially clustered morphotypes (variant: mosaic, the default, foci or "
                         "arrangement)")
    ap.add_argument("--tumour-fraction", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="with --clustered: SynthSpec.tumour_fraction (default: the variant's own range)")
    ap.add_argument("--epochs", type=int, help="override train.epochs of configs/demo.yaml")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--cache", type=Path, help="JSON-lines file of finished runs: resume an interrupted benchmark")
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' (or, with --clustered, "
                    f"'{TITLE_CLUSTERED[3:]}') of this markdown file")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.perf_counter()
    ablations = None if args.ablations is None else (args.ablations or True)
    results = run(args.seeds, args.models, args.epochs, ablations, args.federated,
                  log=lambda s: print(s, flush=True), cache=args.cache, clustered=args.clustered,
                  tumour_fraction=tuple(args.tumour_fraction) if args.tumour_fraction else None)
    wall = time.perf_counter() - t0
    load = f"load average before / after {' '.join(load0)} / {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    text = table(results) + ("\n\n" + pooling_goal(results) if pooling_goal(results) else "")
    times = "; ".join(f"{k} {np.mean(v):.0f} s" for k, v in results["_seconds"].items() if v)
    print(text)
    print(f"\nmean wall time per run: {times}; total {wall / 60:.1f} min; {load}")
    if args.write:
        cached = results["_cached"]
        reused = (f"; {cached} of the runs taken from the cache of an earlier invocation (`--cache`): the wall "
                  "time and load average are this invocation's, the per-run times the recorded ones") if cached else ""
        body = (f"Command: `nice -n 5 {_command(args, ap)}` ({wall / 60:.0f} min, {args.threads} torch thread(s), "
                f"{load}{reused}); centralized unless marked federated, configs/demo.yaml, held-out site test set "
                "(60 patients per seed); mean (sd) over seeds; `/ oracle` = mean metric / mean oracle metric.\n\n")
        if args.clustered:
            body += COHORTS[args.clustered] + "\n\n"
        if args.tumour_fraction:
            body += "Here `--tumour-fraction {:g} {:g}`: the tumour is {:g}-{:g}% of the {}.\n\n".format(
                *args.tumour_fraction, *(100 * f for f in args.tumour_fraction),
                "regions" if args.clustered == "mosaic" else "patches")
        body += text
        if args.clustered:
            write_clustered(args.write, body, args.epochs, args.tumour_fraction,
                            spatial_heading(args.clustered, results, args.epochs, args.tumour_fraction))
        else:
            write_section(args.write, TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

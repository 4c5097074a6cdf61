"""What pathology alone carries in the clustered "foci" (or "arrangement") cohorts: linear probes on bag summaries.

    python -m bench.bench_clustered_probe [--seeds 0 1 2 3 4] [--tumour-fraction LOW HIGH]
                                          [--variant foci|arrangement] [--write docs/benchmarks.md]

For each seed's cohort (the one ``bench_synthetic --clustered foci`` trains on) every patch is
labelled by its nearest generator centroid (the site's stain undone; the generator's world is a
function of the seed), and a standardised logistic regression, leave-one-site-out, predicts grade
and subtype from three patient summaries of the pathology: the bag mean of the raw features (what
a linear read of mean pooling sees), the morphotype shares over all patches (the masked mean of an
ideal one-hot patch embedding), and the shares over the tumour patches only plus necrosis (what
an ideal selective pooling sees). With ``--variant arrangement`` a fourth summary reads the layout:
per patient, the mean over its tumour (and necrosis) patches of the tumour share among their 8
grid neighbours, with the same ideal one-hot labels; the cohort's grade lives there, not in the
shares. Macro one-vs-rest AUC over all patients with slides. The figures go to their own
subsection of bench_synthetic's clustered section.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench._harness import loadavg, write_section
from bench.bench_synthetic import TITLE_CLUSTERED, clustered_body

HEADING = "### Linear probes: what the pathology carries (bench_clustered_probe)"
NEIGHBOURHOOD = "tumour share among the tumour patches' 8 grid neighbours (layout)"


def tumour_neighbour_shares(tumour: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Per tumour patch with at least one grid neighbour (the 8 cells around it), the share of its
    neighbours that are tumour; ``cells`` (n, 2) integer grid cells of one slide."""
    where = {tuple(c): bool(t) for c, t in zip(cells.tolist(), tumour.tolist())}
    shares = []
    for (x, y), t in where.items():
        around = [where[(x + dx, y + dy)] for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                  if (dx or dy) and (x + dx, y + dy) in where]
        if t and around:
            shares.append(np.mean(around))
    return np.array(shares)


def patch_kinds(data_dir: Path, spec) -> dict[str, tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """case_id -> (site, subtype, morphotype of every patch of its slides, their mean raw feature,
    :func:`tumour_neighbour_shares` of every slide's tumour and necrosis patches, concatenated)."""
    import pandas as pd

    from umeml.data.bags import read_coords, read_features
    from umeml.data.synth import PATCH_SIZE, _world

    world = _world(spec, np.random.default_rng(spec.seed))
    centroids = np.concatenate([world.centroids, world.background, world.necrosis])
    table = pd.read_csv(data_dir / "table.csv", dtype={"slide_id": str}, keep_default_na=False)
    site_index = {code: s for s, code in enumerate(sorted(table["site"].unique()))}
    kinds: dict = {}
    for row in table[table["slide_id"] != ""].itertuples():
        feats = read_features(data_dir / "bags" / f"{row.slide_id}.h5")
        s = site_index[row.site]
        x = (feats - world.site_offset[s]) / world.site_scale[s]
        k = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        kinds.setdefault(row.case_id, (row.site, row.oncotree_code, [], [], []))
        kinds[row.case_id][2].append(k)
        kinds[row.case_id][3].append(feats)
        tumour = (k < spec.morphotypes) | (k == len(centroids) - 1)  # tumour morphotypes and necrosis
        cells = read_coords(data_dir / "bags" / f"{row.slide_id}.h5") // PATCH_SIZE
        kinds[row.case_id][4].append(tumour_neighbour_shares(tumour, cells))
    return {c: (site, code, np.concatenate(k), np.concatenate(f).mean(0), np.concatenate(n))
            for c, (site, code, k, f, n) in kinds.items()}


def _loso_auc(y: np.ndarray, x: np.ndarray, sites: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(y), int(y.max()) + 1))
    for site in np.unique(sites):
        test = sites == site
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x[~test], y[~test])
        probs[np.ix_(test, clf.classes_)] = clf.predict_proba(x[test])
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def foci_spec(seed: int, tumour_fraction=None, **size):
    """The foci cohort of ``seed`` that ``bench_synthetic --clustered foci`` trains on (4 sites x 60
    patients); ``size`` overrides SynthSpec's size fields (the tests' tiny cohorts)."""
    from umeml.data.synth import SynthSpec

    return SynthSpec(**{"sites": 4, "patients": 60, **size}, seed=seed, clustered=True, clustered_variant="foci",
                     tumour_fraction=tumour_fraction)


def arrangement_spec(seed: int, tumour_fraction=None, **size):
    """The arrangement cohort of ``seed`` that ``bench_synthetic --clustered arrangement`` trains on."""
    from umeml.data.synth import SynthSpec

    return SynthSpec(**{"sites": 4, "patients": 60, **size}, seed=seed, clustered=True,
                     clustered_variant="arrangement", tumour_fraction=tumour_fraction)


def patient_summaries(spec) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The cohort of ``spec`` as the probes see it: every patient's site, its labels
    ``{"grade", "subtype"}`` (class indices) and ``{summary name: patients x features}``."""
    from umeml.config import DEFAULT_GRADE_MAP
    from umeml.data.synth import BACKGROUND_MORPHOTYPES, SUBTYPES, generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(spec, Path(tmp) / "cohort")
        patients = patch_kinds(Path(tmp) / "cohort", spec)
    cases = sorted(patients)
    sites = np.array([patients[c][0] for c in cases])
    labels = {"grade": np.array([("II", "III", "IV").index(DEFAULT_GRADE_MAP[patients[c][1]]) for c in cases]),
              "subtype": np.array([SUBTYPES.index(patients[c][1]) for c in cases])}
    q, necrosis = spec.morphotypes, spec.morphotypes + BACKGROUND_MORPHOTYPES
    counts = np.array([np.bincount(patients[c][2], minlength=necrosis + 1) for c in cases]).astype(float)
    tumour = counts[:, list(range(q)) + [necrosis]]
    summaries = {
        "bag mean of the raw features": np.array([patients[c][3] for c in cases]),
        "morphotype shares, all patches": counts / counts.sum(1, keepdims=True),
        "morphotype shares, tumour patches (+ necrosis)": tumour / np.clip(tumour.sum(1, keepdims=True), 1, None),
    }
    if spec.clustered_variant == "arrangement":  # the foci table keeps its rows
        summaries[NEIGHBOURHOOD] = np.array([[patients[c][4].mean() if len(patients[c][4]) else 0.0] for c in cases])
    return sites, labels, summaries


def probe(spec) -> dict[str, tuple[float, float]]:
    """{summary: (grade AUC, subtype AUC)} on the cohort of ``spec`` (:func:`foci_spec`)."""
    sites, labels, summaries = patient_summaries(spec)
    return {name: (_loso_auc(labels["grade"], x, sites), _loso_auc(labels["subtype"], x, sites))
            for name, x in summaries.items()}


def main(argv=None) -> int:
    """Probe every seed, print the table, optionally write it into the clustered section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--tumour-fraction", type=float, nargs=2, metavar=("LOW", "HIGH"))
    ap.add_argument("--variant", choices=("foci", "arrangement"), default="foci",
                    help="the clustered variant's cohorts (default foci)")
    ap.add_argument("--write", type=Path, help=f"put the table into '{TITLE_CLUSTERED[3:]}' of this markdown file")
    args = ap.parse_args(argv)
    load0 = loadavg()
    fraction = tuple(args.tumour_fraction) if args.tumour_fraction else None
    spec_of = foci_spec if args.variant == "foci" else arrangement_spec
    per_seed = [probe(spec_of(seed, fraction)) for seed in args.seeds]
    lines = ["| patient summary (linear probe) | grade auc_macro | subtype auc_macro |", "| --- | --- | --- |"]
    for name in per_seed[0]:
        g, s = (np.array([r[name][i] for r in per_seed]) for i in (0, 1))
        lines.append(f"| {name} | {g.mean():.3f} ({g.std():.3f}) | {s.mean():.3f} ({s.std():.3f}) |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        cmd = "python -m bench.bench_clustered_probe --seeds " + " ".join(map(str, args.seeds))
        cmd += f" --variant {args.variant}" * (args.variant != "foci")
        if fraction:
            cmd += f" --tumour-fraction {fraction[0]:g} {fraction[1]:g}"
        body = (f"Command: `nice -n 5 {cmd}` (load average before / after {load0} / {loadavg()}); the cohorts of "
                "the runs above, mean (sd) over seeds; leave-one-site-out, all patients with slides.\n\n" + text)
        heading = (HEADING + f", {args.variant} cohort" * (args.variant != "foci")
                   + (f", --tumour-fraction {fraction[0]:g} {fraction[1]:g}" if fraction else ""))
        write_section(args.write, TITLE_CLUSTERED, clustered_body(args.write, body, None, heading=heading))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 17 item 5: what the DP releases of the preprocessing statistics cost and what the
coordinator makes of them. No training; a few seconds of CPU.

1. Budget: at the DP demo's schedule (configs/demo_dp.yaml: epsilon 8, delta 1e-5, 10 rounds x 2
   steps at q = 0.5) the DP-SGD noise multiplier calibrated alone and with the default releases
   (survival histogram 1.0, class counts 1.5, genomic moments 0.5), and the composed total.
2. Merge: the genomic standardisation and the class weights from DP releases against the exact
   ones, over noise seeds, on the synthetic demo world (training sites A0-A2, 60 patients each,
   small bags: the genomics and labels are the demo's) and on TCGA GBM-LGG genomics (the 8
   training sites of configs/gbmlgg_genomics.yaml). The baseline is no standardisation at all
   (mean 0, std 1), what the shrinkage falls back to when the noise dominates.

    python -m bench.bench_stats_release [--seeds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench._harness import REPO, TCGA, command, loadavg, write_section

SECTION = "## Privacy: the preprocessing releases (issue 17 item 5)"


def budget_rows(target: float = 8.0, delta: float = 1e-5, q: float = 0.5, steps: int = 20) -> list[str]:
    """The DP-SGD calibration alone, with room for the releases of a federation from a public
    checkpoint (class counts only: the checkpoint gives bins and scale; or, with
    ``preprocessing_source: sites``, histogram and class counts) and with room for all three."""
    from umeml.config import StatsPrivacyConfig
    from umeml.federation.accountants import total_epsilon
    from umeml.federation.privacy import calibrate_noise, compute_epsilon
    from umeml.federation.stats_release import gaussian_noise_multiplier

    sp = StatsPrivacyConfig()
    zc, zg = (gaussian_noise_multiplier(e, delta) for e in (sp.class_counts_epsilon, sp.genomic_epsilon))
    hist_counts = ([(zc, 1.0, 1)], [1.0])
    full = ([(zc, 1.0, 1), (zg, 1.0, 1)], [1.0])
    laplace = ([], [1.0, 0.5])  # the class counts as a pure release of the same noise (sd 2.8)
    counts = ([(zc, 1.0, 1)], [])
    cases = [("DP-SGD calibrated alone (before)", ([], []), full),
             ("with room for the class counts (public checkpoint, `preprocessing_source: auto`)", counts, counts),
             ("with room for histogram + class counts (public checkpoint, `preprocessing_source: sites`)",
              hist_counts, hist_counts),
             ("with room for all three releases", full, full),
             ("(histogram + class counts as discrete Laplace at epsilon 0.5, same noise)", laplace, laplace)]
    rows = []
    for name, (room_g, room_p), (g, p) in cases:
        nm = calibrate_noise(target, delta, q, steps, history=room_g, pure=room_p)
        sgd = [(nm, q, steps)]
        rows.append(f"| {name} | {nm:.3f} | {compute_epsilon(sgd, delta):.3f} | {total_epsilon(sgd + g, p, delta):.3f} | "
                    f"{compute_epsilon(sgd + g, delta) + sum(p):.3f} |")
    return rows


def _sites(cohort, names, cfg, seed):
    from umeml.federation.site import SiteRuntime

    dp = cfg.federation.local_dp if cfg.federation.local_dp.enabled else None
    # every site its own noise (one seed for all would add the same noise at every site)
    return {s: SiteRuntime(s, cohort, cohort.site_indices(s), k_min=cfg.federation.k_min_patients, dp=dp,
                           dp_seed=None if seed is None else 1000 * seed + i) for i, s in enumerate(names)}


def _prep(cohort, names, cfg, seed):
    from umeml.federation.protocol import check_handshakes, combine_preprocessing
    from umeml.train.loop import task_heads

    sites = _sites(cohort, names, cfg, seed)
    schema = check_handshakes({s: r.handshake(cfg) for s, r in sites.items()}, sites[names[0]].handshake()["umeml_version"])
    notes: list[str] = []
    prep = combine_preprocessing({s: r.preprocess(cfg) for s, r in sites.items()}, schema,
                                 task_heads(cfg, len(schema["subtypes"])), cfg.survival.n_bins, notes)
    return prep, notes


def _no_better(mean_err, ident_mean: float) -> bool:
    """Whether the DP means are no better than no standardisation (within 5% of its error)."""
    return bool(np.median(mean_err) >= 0.95 * ident_mean)


def merge_quality(label: str, cohort, names, cfg, seeds: int) -> tuple[str, str, bool, float]:
    """One table row (errors of the DP standardisation and class weights against the exact ones),
    the row's label, whether the DP means are no better than none, the median class-weight error."""
    def with_dp(on: bool):
        dp = dataclasses.replace(cfg.federation.local_dp, enabled=on, target_epsilon=8.0)
        return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, local_dp=dp))

    exact, _ = _prep(cohort, names, with_dp(False), None)
    dp_cfg = with_dp(True)
    m_ex, s_ex = np.asarray(exact.genomic_mean), np.asarray(exact.genomic_std)
    mean_err, std_err, weight_err = [], [], []
    for seed in range(seeds):
        prep, _ = _prep(cohort, names, dp_cfg, seed)
        mean_err.append(np.median(np.abs(np.asarray(prep.genomic_mean) - m_ex) / s_ex))
        std_err.append(np.median(np.abs(np.log(np.asarray(prep.genomic_std) / s_ex))))
        weight_err.append(max(np.max(np.abs(np.asarray(prep.class_weights[t]) / np.asarray(exact.class_weights[t]) - 1)
                                     [np.asarray(exact.class_weights[t]) > 0]) for t in exact.class_weights))
    ident_mean = np.median(np.abs(m_ex) / s_ex)
    ident_std = np.median(np.abs(np.log(s_ex)))
    n = sum(len(cohort.site_indices(s)) for s in names)

    def ms(x):
        return f"{np.median(x):.3f} [{np.min(x):.3f}, {np.max(x):.3f}]"

    row = (f"| {label} | {len(names)} | {n} | {len(m_ex)} | {ms(mean_err)} | {ident_mean:.3f} | {ms(std_err)} | "
           f"{ident_std:.3f} | {ms(weight_err)} |")
    return row, label, _no_better(mean_err, ident_mean), float(np.median(weight_err))


def large_federation_row(seeds: int, sites: int = 10, patients: int = 1000, genes: int = 85) -> tuple:
    """The genomic merge where the noise does not swamp the moments: simulated values only (no
    cohort), genes with means N(0, 0.5^2) and standard deviations uniform on [0.5, 1.5]."""
    from umeml.config import StatsPrivacyConfig
    from umeml.federation.stats_release import genomic_release, merge_genomic_moments

    sp = StatsPrivacyConfig()  # the defaults a federation releases with
    rng = np.random.default_rng(0)
    mu, sd = rng.normal(0, 0.5, genes), rng.uniform(0.5, 1.5, genes)
    rows = [mu + sd * rng.normal(size=(patients, genes)) for _ in range(sites)]
    clipped = np.clip(np.concatenate(rows), -sp.genomic_clip, sp.genomic_clip)
    m_ex, s_ex = clipped.mean(axis=0), clipped.std(axis=0)
    mean_err, std_err = [], []
    for seed in range(seeds):
        replies = []
        for i, r in enumerate(rows):
            rec = genomic_release(r, sp.genomic_clip, sp.genomic_epsilon, 1e-5, seed=1000 * seed + i)
            replies.append({"n": patients, "genomic_count": rec["noisy"]["count"], "genomic_sum": rec["noisy"]["sum"],
                            "genomic_sumsq": rec["noisy"]["sumsq"],
                            "releases": [{k: v for k, v in rec.items() if k != "noisy"}]})
        scaler = merge_genomic_moments(replies, [])
        mean_err.append(np.median(np.abs(scaler.mean - m_ex) / s_ex))
        std_err.append(np.median(np.abs(np.log(scaler.std / s_ex))))

    def ms(x):
        return f"{np.median(x):.3f} [{np.min(x):.3f}, {np.max(x):.3f}]"

    label = "simulated values, means N(0, 0.5^2), sds 0.5-1.5"
    ident_mean = float(np.median(np.abs(m_ex) / s_ex))
    row = (f"| {label} | {sites} | {sites * patients} | {genes} | {ms(mean_err)} | {ident_mean:.3f} | {ms(std_err)} | "
           f"{np.median(np.abs(np.log(s_ex))):.3f} | - |")
    return row, f"{sites} sites x {patients} patients", _no_better(mean_err, ident_mean), float("nan")


def reading(rows: list[tuple]) -> str:
    """What the merge-quality rows say, from this run's numbers (not fixed prose)."""
    useless = [r[1] for r in rows if r[2]]
    useful = [r[1] for r in rows if not r[2]]
    parts = []
    if useless:
        parts.append(f"For {', '.join(useless)} the DP genomic means are no better than no standardisation (mean "
                     "error within 5% of the identity's): the noise swamps the genes' spread and the empirical-Bayes "
                     "shrinkage returns about no standardisation, so the release costs its epsilon and buys nothing "
                     "there (with a public checkpoint, `stats_privacy.genomic_source: auto` takes the checkpoint's "
                     "standardisation at no cost).")
    if useful:
        parts.append(f"For {', '.join(useful)} the DP moments are informative (mean error below the identity's).")
    weights = [f"{r[1]} {r[3]:.0%}" for r in rows if r[3] == r[3]]
    if weights:
        parts.append("The largest class-weight error (median over noise seeds; it comes from the smallest class): "
                     + ", ".join(weights) + ".")
    parts.append("In the composed total a pure release costs about its full epsilon, a Gaussian one less than its "
                 "epsilon alone (first table): the class counts are Gaussian for that reason.")
    return " ".join(parts)


def demo_cohort(work: Path):
    from umeml.config import load_config
    from umeml.data.cohort import load_data_dir
    from umeml.data.synth import SynthSpec, generate

    cfg = load_config(REPO / "configs" / "demo_dp.yaml")
    out = work / "demo"
    generate(SynthSpec(sites=4, patients=60, feature_dim=8, median_patches=8, min_patches=4, max_patches=16), out)
    return load_data_dir(out, cfg.data), cfg


def gbmlgg_cohort():
    from umeml.config import load_config
    from umeml.data.cohort import load_cohort

    cfg = load_config(REPO / "configs" / "gbmlgg_genomics.yaml")
    cohort = load_cohort(TCGA / "tcga_gbmlgg_all_clean.csv.gz", TCGA / "signatures.csv", None, cfg.data, cfg.tasks)
    return cohort, cfg


def main(argv=None) -> int:
    """Run both parts, print them and (unless --no-write) write the section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cohort, cfg = demo_cohort(Path(tmp))
        rows = [merge_quality("synthetic demo world", cohort, ["A0", "A1", "A2"], cfg, args.seeds)]
    if (TCGA / "tcga_gbmlgg_all_clean.csv.gz").is_file():
        cohort, cfg = gbmlgg_cohort()
        rows.append(merge_quality("TCGA GBM-LGG genomics", cohort, list(cfg.federation.train_sites), cfg, args.seeds))
    rows.append(large_federation_row(args.seeds))
    load = loadavg()
    body = "\n".join([
        f"`{command('bench.bench_stats_release', argv if argv is not None else sys.argv[1:])}`; load average {load}.",
        "",
        "Budget at the DP demo's schedule (epsilon 8, delta 1e-5, 20 DP-SGD steps at q = 0.5; releases: survival "
        "histogram 1.0, pure; class counts 1.5 and genomic moments 0.5, Gaussian, epsilons alone). "
        "`dp.target_epsilon` is the site's total, so DP-SGD gets what the releases leave:",
        "",
        "| calibration | noise multiplier | DP-SGD epsilon alone | total epsilon (RDP, the releases made) | "
        "basic sum |",
        "|---|---|---|---|---|",
        *budget_rows(),
        "",
        f"The coordinator's merge of the DP statistics (defaults: clip 3, epsilons 1.5 / 0.5) against the exact "
        f"ones, median [min, max] over {args.seeds} noise seeds. Mean error: median over genes of |mean_dp - "
        "mean_exact| / std_exact; std error: median over genes of |log(std_dp / std_exact)|; the identity columns "
        "are the same errors of no standardisation (mean 0, std 1); class weights: the largest relative error of "
        "a class weight (grade and subtype).",
        "",
        "| cohort | sites | patients | genomic values | mean error | identity | std error | identity | "
        "class weight error |",
        "|---|---|---|---|---|---|---|---|---|",
        *(r[0] for r in rows),
        "",
        reading(rows),
    ])
    print(body)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

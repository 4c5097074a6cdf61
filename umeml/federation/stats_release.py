"""DP releases of the preprocessing statistics: class counts and genomic moments.

With ``federation.stats_privacy`` on (by default whenever local DP is), a training site sends
these statistics noised, and records each release in its privacy ledger (``privacy.json``,
``releases``) next to the survival histogram; its DP-SGD budget is what remains (see
:mod:`umeml.federation.privacy`). The unit of privacy is one patient, added or removed, as for
DP-SGD (Opacus's Poisson sampling).

Class counts (Gaussian, ``class_counts_epsilon`` at the site's delta)
    The grade of a patient is a function of the subtype code (``data.grade_map``), so one
    histogram is released: one cell per subtype class, then one cell per grade that a code
    outside the listed subtypes maps to. A patient is in at most one cell, so the L2
    sensitivity is 1, and Gaussian noise of standard deviation z per cell is a Gaussian mechanism
    of noise multiplier z; the subtype counts and the grade counts are sums of noisy cells
    (post-processing, free). Gaussian, not discrete Laplace, because what matters is the cost in
    the site's composed total: at the same noise (sd 2.8) the pure epsilon-DP release (epsilon
    0.5) costs DP-SGD 0.44 of its epsilon at a total of 8, the Gaussian (epsilon 1.5 alone) 0.23
    (``python -m bench.bench_stats_release``): a pure release costs about its full epsilon at the
    orders where the total is converted.

Genomic moments (Gaussian, ``genomic_epsilon`` at the site's delta)
    Every value of the concatenated genomic vector (``d`` entries, a column listed in two groups
    counts twice) is clipped to [-B, B] (``genomic_clip``, raw units: the features arrive as
    z-scores, CNV -2..2 or 0/1 mutations). Adding or removing one patient changes the count of
    patients with genomics by 1, the per-gene sum vector by at most ||clip(x)||_2 <= B sqrt(d)
    and the sum-of-squares vector by at most ||clip(x)^2||_2 <= B^2 sqrt(d) (L2 over genes).
    Block b (count, sum, sumsq) gets Gaussian noise of standard deviation
    sigma_b = Delta_b z / sqrt(w_b) with shares w = (0.1, 0.45, 0.45). Independent Gaussian blocks
    compose like one Gaussian whose sensitivity / noise ratio is sqrt(sum_b (Delta_b/sigma_b)^2)
    = 1/z, so the release is a Gaussian mechanism of noise multiplier z, (alpha, alpha / (2 z^2))-RDP
    (the Gaussian mechanism's RDP, Mironov 2017, "Renyi differential privacy", Sec. VI), and is accounted as one sampled-Gaussian
    step with sample rate 1. z is calibrated so that the release alone costs at most
    ``genomic_epsilon`` at delta.

    The count is one number (released once, repeated for every gene after the noise). Under
    DP a site sends the moments whenever it has >= k training patients and genomic columns,
    whatever the number of patients with genomics: deciding on that exact number would leak it.

The coordinator's merge (:func:`merge_genomic_moments`, :func:`merge_class_counts`) knows each
release's noise (sent with it) and keeps the result sane: a site's noisy count is clamped to
[0, its training patients] and shrunk toward that number by its noise; per gene the mean and
variance estimates are shrunk toward 0 and 1 (the scale the clip bound presumes) by empirical
Bayes (positive-part James-Stein: the genes' spread around 0 / 1 estimated by the method of
moments against the known noise variance), so that where the noise swamps the spread the
result is no standardisation rather than noise; noisy class totals are
floored at one noise standard deviation so that no class gets a zero or huge weight. Each
fallback is described in the preprocessing notes.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass

import numpy as np

from umeml.errors import UmemlError
from umeml.federation.privacy import calibrate_noise, compute_epsilon

CLASS_COUNTS = "class_counts"
GENOMIC_MOMENTS = "genomic_moments"
GENOMIC_SHARES = {"count": 0.1, "sum": 0.45, "sumsq": 0.45}  # fractions of 1/z^2 per block
CLASS_NOISE_STREAM = 7927  # simulations' seeded noise streams (next to the histogram's 7919)
GENOMIC_NOISE_STREAM = 7933
FEATURE_MOMENTS = "feature_moments"
FEATURE_SHARES = {"count": 0.1, "sum": 0.7, "sumsq": 0.2}  # fractions of 1/z^2 per block (the centre first)
FEATURE_NOISE_STREAM = 7937
MIN_VARIANCE = 0.01  # a DP variance never scales a gene by more than 10 (std >= 0.1)


# "auto" release epsilons: each a fifth of the site's local-DP total, at most its value at a total of
# 8 (where AUTO_SHARE of 8 is above them all): at 8 the three releases cost DP-SGD about a fifth of
# its epsilon in the composed total (bench_stats_release), and at a small total they still leave it
# room (fixed numbers took a total of 3 whole: a site at target 1 refused them). A fifth of a total
# below about 1 is below what a Gaussian release can certify at delta 1e-5 (gaussian_noise_multiplier):
# such a site refuses before releasing anything, and says which setting to raise.
AUTO_SHARE = 0.2
AUTO_AT_REFERENCE = {"survival_hist": 1.0, "class_counts": 1.5, "genomic": 0.5, "features": 2.0}


@dataclass(frozen=True)
class ReleaseEpsilons:
    """The epsilon each preprocessing release of a site costs alone, "auto" resolved.

    ``survival_hist`` None: exact counts (``federation.survival_hist_epsilon: null``).
    """

    survival_hist: float | None
    class_counts: float
    genomic: float
    features: float


def release_epsilons(fed, target: float | None) -> ReleaseEpsilons:
    """The release epsilons of ``fed`` (a ``FederationConfig``) at a site whose local-DP total is
    ``target`` (None: the site trains without DP, and "auto" takes the reference values)."""
    def resolve(value, key: str) -> float | None:
        if value == "auto":
            ref = AUTO_AT_REFERENCE[key]
            return ref if target is None else min(ref, AUTO_SHARE * float(target))
        return None if value is None else float(value)

    sp = fed.stats_privacy
    return ReleaseEpsilons(survival_hist=resolve(fed.survival_hist_epsilon, "survival_hist"),
                           class_counts=resolve(sp.class_counts_epsilon, "class_counts"),
                           genomic=resolve(sp.genomic_epsilon, "genomic"),
                           features=resolve(sp.feature_epsilon, "features"))


class StatsPrivacyRefusal(UmemlError):
    """A site refuses a release of statistics its ``site.yaml`` does not allow."""


def _rng(seed: int | None, stream: int) -> np.random.Generator:
    """Seeded noise for simulations and tests; OS entropy (never the experiment seed) otherwise."""
    if seed is None:
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng([seed, stream])


def fingerprint(*parts) -> str:
    """SHA-256 of exact statistics and their settings: a repeated request for the same release
    gets the answer given before (fresh noise could be averaged away). Kept in the site's ledger."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def check_cap(requests: dict[str, float | None], cap: float | None, site_file: str | None, site_id: str) -> None:
    """Refuse (``StatsPrivacyRefusal``) when a requested release costs more than the site's
    ``stats_privacy.max_epsilon``; None in ``requests`` is an exact release."""
    if cap is None:
        return
    where = site_file or f"site {site_id}'s site file"
    for key, eps in requests.items():
        if eps is None or eps > cap:
            asked = "exact values (no noise)" if eps is None else f"epsilon {eps:g}"
            raise StatsPrivacyRefusal(
                f"{where}: stats_privacy.max_epsilon: the federation asks for {asked} for {key}, more than this "
                f"site allows (each release of statistics must cost at most epsilon {cap:g}); the site refuses to "
                "release it: lower the federation's setting or raise the site's cap")


def check_certifiable(requests: dict[str, float], delta: float, site_id: str) -> None:
    """Refuse (``StatsPrivacyRefusal``), before anything is released, a Gaussian release whose
    epsilon no noise can certify at ``delta`` (``requests``: name -> epsilon)."""
    for key, eps in requests.items():
        try:
            gaussian_noise_multiplier(eps, delta, key)
        except ValueError as err:
            raise StatsPrivacyRefusal(f"site {site_id}: {err} ('auto' is a fifth of the site's local-DP total, at "
                                      "most its value at a total of 8)") from err


def check_budget_room(requests: dict[str, float | None], target: float, site_id: str) -> None:
    """Refuse (``StatsPrivacyRefusal``) releases whose epsilons add up to the site's whole
    local-DP budget (``dp.target_epsilon``, the site's total): made anyway, they alone would take
    its total to or past the target (a site at target 1 asked for class counts at 1.5 reached a
    total of 1.50) and leave no step of DP-SGD. The plain sum bounds what they cost together."""
    asked = {k: e for k, e in requests.items() if e is not None}
    if asked and sum(asked.values()) >= target:
        raise StatsPrivacyRefusal(
            f"site {site_id}: dp.target_epsilon is {target:g} (the site's total), but the federation asks for "
            + ", ".join(f"{k} at epsilon {e:g}" for k, e in asked.items())
            + f": together {sum(asked.values()):g}, the whole budget; the site refuses to release them: lower those "
            "settings so that they leave room for DP-SGD")


# ---------------------------------------------------------------------------- class counts
def class_cells(cohort, train: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """Counts of the class-count release's cells over ``train``, with each cell's subtype index
    and grade index (-1: none): a cell per subtype class, then a cell per grade that a code of
    ``data.grade_map`` outside the listed subtypes maps to (patients with such a code have a
    grade and no subtype class; with the default label maps there is none, and a cell no patient
    can be in need not be released). Each patient is in at most one cell."""
    from umeml.data.labels import grade_index

    n_sub = len(cohort.subtypes)
    extra = sorted({grade_index(code, cohort.config) for code in cohort.config.grade_map
                    if code not in cohort.subtypes} - {-1})
    cell_sub = list(range(n_sub)) + [-1] * len(extra)
    cell_grade = [grade_index(code, cohort.config) for code in cohort.subtypes] + extra
    counts = np.zeros(len(cell_sub), dtype=np.int64)
    for i in train:
        s, g = cohort.subtype_index(i), cohort.grade_index(i)
        if s >= 0:
            counts[s] += 1
        elif g in extra:
            counts[n_sub + extra.index(g)] += 1
    return counts, cell_sub, cell_grade


def marginals(cells, cell_sub: list[int], cell_grade: list[int], n_sub: int, n_grade: int) -> tuple[list, list]:
    """Subtype and grade counts as sums of (noisy) cells."""
    sub, grade = np.zeros(n_sub), np.zeros(n_grade)
    for value, s, g in zip(np.asarray(cells, dtype=float), cell_sub, cell_grade):
        if s >= 0:
            sub[s] += value
        if g >= 0:
            grade[g] += value
    as_int = all(float(v).is_integer() for v in np.asarray(cells, dtype=float))
    cast = (lambda a: [int(v) for v in a]) if as_int else (lambda a: [float(v) for v in a])
    return cast(sub), cast(grade)


def class_counts_release(cells: np.ndarray, cell_grade: list[int], epsilon: float, delta: float,
                         seed: int | None) -> dict:
    """The noisy cells and the public description of their release: Gaussian noise of standard
    deviation z per cell (L2 sensitivity 1: a patient is in one cell), z calibrated so that the
    release alone costs at most ``epsilon`` at ``delta``; ``cells_per_grade`` is the most cells
    summed into one grade count, which sets that count's noise."""
    z = gaussian_noise_multiplier(epsilon, delta, "class_counts_epsilon")
    noisy = (cells + _rng(seed, CLASS_NOISE_STREAM).normal(0.0, z, cells.shape)).tolist()
    per_grade = max([cell_grade.count(g) for g in set(cell_grade) if g >= 0], default=1)
    return {"kind": CLASS_COUNTS, "epsilon": compute_epsilon([(z, 1.0, 1)], delta), "delta": float(delta),
            "noise_multiplier": z, "sample_rate": 1.0, "steps": 1, "cells": int(len(cells)),
            "cells_per_grade": int(per_grade), "sensitivity": {"count": 1.0}, "noise_std": {"count": z},
            "mechanism": "Gaussian per cell, L2 sensitivity 1 (a subtype histogram; grade counts derived from it)",
            "noisy_cells": noisy}


# ---------------------------------------------------------------------------- genomic moments
def genomic_sensitivity(clip: float, dim: int) -> dict[str, float]:
    """L2 sensitivity of count, per-gene sum and per-gene sum of squares under adding or removing
    one patient whose every value is clipped to [-clip, clip]."""
    return {"count": 1.0, "sum": float(clip) * math.sqrt(dim), "sumsq": float(clip) ** 2 * math.sqrt(dim)}


def gaussian_noise_multiplier(epsilon: float, delta: float, key: str = "genomic_epsilon") -> float:
    """A Gaussian release's noise multiplier z: the smallest (within 1 %) whose epsilon at
    ``delta`` (Opacus RDP of one step at sample rate 1, i.e. alpha / (2 z^2)) is <= ``epsilon``."""
    z = calibrate_noise(float(epsilon), float(delta), 1.0, 1)
    if z is None:
        raise ValueError(f"federation.stats_privacy.{key} {epsilon:g}: no Gaussian noise reaches it at delta "
                         f"{delta:g} under Opacus's RDP orders (up to 63: below about log(1/delta)/62 epsilon cannot be "
                         "certified); ask for a larger epsilon")
    return float(z)


def block_noise_std(sensitivity: dict[str, float], shares: dict[str, float], z: float) -> dict[str, float]:
    """Per block b the noise sd Delta_b z / sqrt(w_b): blocks whose shares w sum to 1 compose to
    one Gaussian mechanism of noise multiplier z (module docstring, genomic moments)."""
    return {b: sensitivity[b] * z / math.sqrt(w) for b, w in shares.items()}


def genomic_release(rows: np.ndarray, clip: float, epsilon: float, delta: float, seed: int | None) -> dict:
    """Noisy count, sum and sum of squares of ``rows`` (patients x genes, raw values) clipped to
    [-clip, clip], and the public description of the release (see the module docstring)."""
    rows = np.clip(np.asarray(rows, dtype=np.float64), -clip, clip)
    dim = rows.shape[1]
    z = gaussian_noise_multiplier(epsilon, delta)
    sens = genomic_sensitivity(clip, dim)
    std = block_noise_std(sens, GENOMIC_SHARES, z)
    rng = _rng(seed, GENOMIC_NOISE_STREAM)
    count = float(len(rows)) + rng.normal(0.0, std["count"])
    total = rows.sum(axis=0) + rng.normal(0.0, std["sum"], dim)
    total_sq = (rows ** 2).sum(axis=0) + rng.normal(0.0, std["sumsq"], dim)
    return {"kind": GENOMIC_MOMENTS, "epsilon": compute_epsilon([(z, 1.0, 1)], delta), "delta": float(delta),
            "noise_multiplier": z, "sample_rate": 1.0, "steps": 1, "clip": float(clip), "genes": int(dim),
            "mechanism": "Gaussian on count, per-gene sum and sum of squares of values clipped to [-clip, clip]; "
                         "L2 sensitivities 1, clip sqrt(genes), clip^2 sqrt(genes)",
            "sensitivity": sens, "noise_std": std, "shares": dict(GENOMIC_SHARES),
            "noisy": {"count": [count] * dim, "sum": total.tolist(), "sumsq": total_sq.tolist()}}


# ---------------------------------------------------------------------------- patch-feature moments
def feature_sensitivity(clip: float, dim: int) -> dict[str, float]:
    """L2 sensitivity of the count, the sum of patients' mean features clipped to L2 norm
    ``clip`` and the sum of their mean squares clipped to ``[0, 4 clip^2 / dim]`` (patches up to
    twice the clip norm) under adding or removing one patient."""
    return {"count": 1.0, "sum": float(clip), "sumsq": 4.0 * float(clip) ** 2 / dim}


def feature_moments_release(means: np.ndarray, squares: np.ndarray, clip: float, epsilon: float, delta: float,
                            seed: int | None) -> dict:
    """A site's patch-feature moments for its own standardisation (``data.site_standardise``): the
    noisy count of patients with pathology, the noisy sum of their mean features (each clipped to
    L2 norm ``clip``) and of their mean squares (clipped to ``[0, 4 clip^2 / D]``), Gaussian
    blocks composing to one Gaussian mechanism of noise multiplier z (as the genomic moments,
    shares :data:`FEATURE_SHARES`), calibrated so that the release alone costs at most ``epsilon``
    at ``delta``. The values stay at the site; the record (without them) is reported."""
    means = np.asarray(means, np.float64)
    dim = means.shape[1]
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    clipped = means * np.minimum(1.0, float(clip) / np.maximum(norms, 1e-12))
    sens = feature_sensitivity(clip, dim)
    sq = np.clip(np.asarray(squares, np.float64), 0.0, sens["sumsq"])
    z = gaussian_noise_multiplier(epsilon, delta, "feature_epsilon")
    std = block_noise_std(sens, FEATURE_SHARES, z)
    rng = _rng(seed, FEATURE_NOISE_STREAM)
    noisy = {"count": float(len(means)) + rng.normal(0.0, std["count"]),
             "sum": (clipped.sum(axis=0) + rng.normal(0.0, std["sum"], dim)).tolist(),
             "sumsq": float(sq.sum()) + rng.normal(0.0, std["sumsq"])}
    return {"kind": FEATURE_MOMENTS, "epsilon": compute_epsilon([(z, 1.0, 1)], delta), "delta": float(delta),
            "noise_multiplier": z, "sample_rate": 1.0, "steps": 1, "clip": float(clip), "features": int(dim),
            "clipped_patients": int((norms[:, 0] > clip).sum()),
            "mechanism": "Gaussian on count, sum of patients' mean features clipped to L2 norm clip and sum of "
                         "their mean squares clipped to [0, 4 clip^2 / D]; kept at the site (its own "
                         "standardisation), only this record is reported",
            "sensitivity": sens, "noise_std": std, "shares": dict(FEATURE_SHARES), "noisy": noisy}


def private_standardiser(cohort, idx: np.ndarray, cfg, site: str, delta: float, epsilon: float, ledger=None,
                         seed: int | None = None):
    """The site's :class:`~umeml.data.site_norm.SiteStandardiser` from a DP release of its
    patch-feature moments over the patients ``idx`` (recorded in ``ledger`` once per fingerprint),
    and the release's public record (what the run's privacy report lists)."""
    from umeml.data.site_norm import from_moments, patient_moments
    from umeml.errors import ConfigError

    clip = cfg.data.feature_clip
    if clip is None:
        raise ConfigError("data.feature_clip: site_standardise 'features' under statistics privacy needs the L2 "
                          "bound of a patient's mean patch feature (the encoder's units, e.g. the 99th percentile "
                          "of the public cohort's patient means); none is set")
    means, squares = patient_moments(cohort, idx)
    key = fingerprint(FEATURE_MOMENTS, means, squares, float(clip), float(epsilon), float(delta))
    record = _recorded(ledger, FEATURE_MOMENTS, key,
                       lambda: feature_moments_release(means, squares, clip, epsilon, delta, seed), site, cfg.name)
    noisy = record["noisy"]
    count = max(1.0, float(noisy["count"]))  # a noisy count below 1 would divide by noise
    return from_moments(count, np.asarray(noisy["sum"]), float(noisy["sumsq"]), "dp"), public_record(record)


def public_record(record: dict) -> dict:
    """What a site sends of a release's record: its description, not the values (sent apart)
    nor the fingerprint of the exact statistics (kept at the site)."""
    return {k: v for k, v in record.items()
            if k not in ("noisy", "noisy_cells", "fingerprint", "time", "site", "experiment")}


def stamped(record: dict, site: str, experiment: str, key: str) -> dict:
    """A release record as the site's ledger keeps it."""
    return {**record, "site": site, "experiment": experiment, "fingerprint": key,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------------------- coordinator merge
def _release(reply: dict, kind: str) -> dict | None:
    return next((r for r in reply.get("releases", []) if r.get("kind") == kind), None)


def merge_genomic_moments(replies: list[dict], notes: list[str] | None = None):
    """The federation's :class:`~umeml.data.dataset.GenomicScaler` (per-gene mean and standard
    deviation) from the sites' (exact or noisy) moments.

    Exact replies give the usual moments (:meth:`GenomicScaler.from_moments`). With noisy ones
    each site's count is :func:`site_count`, and the per-gene estimates are shrunk toward mean 0
    and variance 1 (:func:`eb_shrink`: the noise variance is known, the genes' spread is estimated
    from the data), then clamped to the clip range. ``notes`` says how much was kept.
    """
    count = total = total_sq = 0.0
    var_sum = var_sq = 0.0
    clips = []
    for r in replies:
        rel = _release(r, GENOMIC_MOMENTS)
        c = np.asarray(r["genomic_count"], float)
        if rel is not None:
            c = site_count(c, float(r["n"]), float(rel["noise_std"]["count"]))
            var_sum += float(rel["noise_std"]["sum"]) ** 2
            var_sq += float(rel["noise_std"]["sumsq"]) ** 2
            clips.append(float(rel["clip"]))
        count = count + c
        total = total + np.asarray(r["genomic_sum"], float)
        total_sq = total_sq + np.asarray(r["genomic_sumsq"], float)
    from umeml.data.dataset import GenomicScaler  # torch: only where a federation is combined

    if not clips:
        return GenomicScaler.from_moments(count, total, total_sq)
    mean, std = _shrunk_moments(count, total, total_sq, var_sum, var_sq, max(clips), notes)
    return GenomicScaler(mean.astype(np.float32), std.astype(np.float32))


def site_count(noisy, n: float, sd: float):
    """A site's count of patients with genomics from its noisy count: clamped to [0, n] (its
    training patients, sent as ``n``) and shrunk toward n by the noise (weight n^2 / (n^2 + sd^2):
    a prior that most patients have genomics), so that an uninformative count does not decide."""
    w = n ** 2 / (n ** 2 + sd ** 2)
    return w * np.clip(np.asarray(noisy, float), 0.0, n) + (1.0 - w) * n


def eb_shrink(estimate: np.ndarray, centre: float, noise_var: np.ndarray) -> tuple[np.ndarray, float]:
    """Positive-part James-Stein / empirical-Bayes shrinkage of per-gene ``estimate`` toward
    ``centre``: the genes' spread around it (tau^2) is estimated by the method of moments as the
    mean squared deviation minus the mean noise variance (counted only beyond three standard errors
    of that difference under pure noise; at least 0), and each gene keeps the
    fraction tau^2 / (tau^2 + its noise variance) of its deviation. Returns the shrunk values and
    the median fraction kept. Where the noise swamps the spread everything goes to ``centre``."""
    dev = np.asarray(estimate, float) - centre
    noise_var = np.broadcast_to(np.asarray(noise_var, float), dev.shape)
    # the mean squared deviation of G genes of pure Gaussian noise exceeds the noise variance by
    # about sqrt(2 / G) of it (one standard error): only an excess beyond three of them is spread
    excess = float(np.mean(dev ** 2) - np.mean(noise_var) * (1.0 + 3.0 * np.sqrt(2.0 / dev.size)))
    tau2 = max(0.0, excess)
    keep = tau2 / (tau2 + noise_var) if tau2 > 0 else np.zeros_like(dev)
    return centre + keep * dev, float(np.median(keep))


def _shrunk_moments(count, total, total_sq, var_sum: float, var_sq: float, clip: float,
                    notes: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """The noisy branch of :func:`merge_genomic_moments`."""
    notes = [] if notes is None else notes
    n = np.asarray(count, float)
    if float(n.min()) < 1.0:
        notes.append("genomic standardisation: the noisy count of patients with genomics is below 1; genes are "
                     "left unstandardised (mean 0, std 1)")
        return np.zeros_like(n), np.ones_like(n)
    s_m2 = var_sum / n ** 2  # noise variance of each gene's mean, then of its second moment
    s_v2 = var_sq / n ** 2
    mean, keep_m = eb_shrink(np.asarray(total) / n, 0.0, s_m2)
    mean = np.clip(mean, -clip, clip)
    var, keep_v = eb_shrink(np.asarray(total_sq) / n - mean ** 2, 1.0, s_v2)
    var = np.clip(var, MIN_VARIANCE, clip ** 2)
    notes.append(f"genomic standardisation from DP moments: noise sd of a gene's mean {np.sqrt(np.median(s_m2)):.3g}, "
                 f"of its variance {np.sqrt(np.median(s_v2)):.3g} (medians over genes); shrunk toward 0 and 1, the "
                 f"estimates keep {keep_m:.0%} (mean) and {keep_v:.0%} (variance) of their distance from them")
    return mean, np.sqrt(var)


def merge_class_counts(replies: list[dict], task: str, notes: list[str] | None = None) -> np.ndarray:
    """The federation's class counts of ``task`` from the sites' (exact or noisy) counts.

    Noisy totals are floored at one standard deviation of their noise (at least 1): a class the
    config declares is treated as present, so the inverse-frequency weights stay finite and
    none is zero because noise pulled its count below 1."""
    counts = np.sum([np.asarray(r[f"{task}_counts"], float) for r in replies], axis=0)
    noise_var = 0.0
    for r in replies:
        rel = _release(r, CLASS_COUNTS)
        if rel is not None:
            cells = float(rel.get("cells_per_grade", rel.get("cells", 1))) if task == "grade" else 1.0
            noise_var += float(rel["noise_std"]["count"]) ** 2 * cells
    if noise_var == 0.0:
        return counts
    floor = max(1.0, math.sqrt(noise_var))
    low = counts < floor
    if low.any() and notes is not None:
        notes.append(f"{task} class counts from DP releases: {int(low.sum())} class total(s) below the noise sd "
                     f"{floor:.3g} set to it (every declared class is treated as present)")
    return np.maximum(counts, floor)


def checkpoint_standardisation(prep, path: str | None, notes: list[str]):
    """``prep`` with the genomic standardisation of the checkpoint at ``path`` (its meta's
    ``genomic_mean`` / ``genomic_std``, which ``umeml train`` records): the public model's own
    input scale, for ``federation.stats_privacy.genomic_source: checkpoint``."""
    import dataclasses

    from umeml.errors import ConfigError
    from umeml.model import load

    key = "federation.stats_privacy.genomic_source"
    if not path:
        raise ConfigError(f"{key}: 'checkpoint' needs federation.init_checkpoint (a public checkpoint)")
    fix = f"; set {key}: sites to release DP moments instead"
    if not prep.group_sizes:
        return prep
    _, meta = load(path)
    mean, std = meta.get("genomic_mean"), meta.get("genomic_std")
    if mean is None or std is None or len(mean) != sum(prep.group_sizes):
        raise ConfigError(f"{path}: {key} uses the checkpoint's genomic standardisation, but its meta has none "
                          f"for {sum(prep.group_sizes)} values (genomic_mean / genomic_std, recorded by umeml train)"
                          + fix)
    notes.append(f"genomic standardisation: the public checkpoint's ({path}); no site released genomic moments")
    return dataclasses.replace(prep, genomic_mean=[float(v) for v in mean], genomic_std=[float(v) for v in std])


# ---------------------------------------------------------------------------- site side
def _recorded(ledger, kind: str, key: str, make, site: str, experiment: str) -> dict:
    """``make()``'s record, released once per fingerprint through the site's ledger (None: not recorded)."""
    if ledger is None:
        return make()
    record, _ = ledger.release_once(kind, key, lambda: stamped(make(), site, experiment, key))
    return record


def private_statistics(cohort, train: np.ndarray, cfg, site: str, delta: float, epsilons: ReleaseEpsilons,
                       ledger=None, seed: int | None = None) -> dict:
    """The class counts and genomic moments of a preprocess reply as DP releases at ``epsilons``
    (the site's, :func:`release_epsilons`), with their public records under ``releases`` (see the
    module docstring). With a ``ledger`` (a :class:`~umeml.federation.privacy.SiteLedger`, its
    lock held) each release is recorded there and a repeated request gets the same answer."""
    sp = cfg.federation.stats_privacy
    cells, cell_sub, cell_grade = class_cells(cohort, train)
    eps_c = epsilons.class_counts
    counts = _recorded(ledger, CLASS_COUNTS, fingerprint(CLASS_COUNTS, cells, eps_c, float(delta), cell_sub, cell_grade),
                       lambda: class_counts_release(cells, cell_grade, eps_c, delta, seed), site, cfg.name)
    sub, grade = marginals(counts["noisy_cells"], cell_sub, cell_grade, len(cohort.subtypes), len(cohort.grades))
    reply = {"grade_counts": grade, "subtype_counts": sub, "releases": [public_record(counts)]}
    if cohort.gene_groups.dim and not cfg.federation.genomics_from_checkpoint:
        idx = np.asarray(train, dtype=np.int64)
        rows = cohort.genomics[idx][cohort.has_genomics[idx]].astype(np.float64)
        clip, eps_g = float(sp.genomic_clip), epsilons.genomic
        clipped = np.clip(rows, -clip, clip)
        key = fingerprint(GENOMIC_MOMENTS, float(len(rows)), clipped.sum(axis=0), (clipped ** 2).sum(axis=0), clip,
                          eps_g, float(delta))
        moments = _recorded(ledger, GENOMIC_MOMENTS, key, lambda: genomic_release(rows, clip, eps_g, delta, seed),
                            site, cfg.name)
        noisy = moments["noisy"]
        reply.update(genomic_count=noisy["count"], genomic_sum=noisy["sum"], genomic_sumsq=noisy["sumsq"])
        reply["releases"].append(public_record(moments))
    return reply

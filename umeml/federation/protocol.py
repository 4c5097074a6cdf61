"""The federation protocol's payloads, free of Flower: what sites answer and how the server combines it.

Only aggregates cross the wire: counts, sums, histograms and metrics, each suppressed when a
site has fewer than k patients. No case id, slide id, path or per-patient value ever appears.
The survival histogram is additionally epsilon-DP (``federation.survival_hist_epsilon``).
"""

from __future__ import annotations

import numpy as np

from umeml.data.labels import edges_from_histogram
from umeml.errors import FederationError
from umeml.federation.stats_release import merge_class_counts, merge_genomic_moments
from umeml.metrics.bootstrap import site_bootstrap_ci
from umeml.rundir import has_value
from umeml.train.experiment import Preprocessing  # defined next to what is built from it; sent every round
from umeml.train.losses import class_weights_from_counts

__all__ = ["HandshakeMismatch", "Preprocessing", "SURVIVAL_GRID_CELLS", "SURVIVAL_GRID_MAX", "SURVIVAL_GRID_TEXT",
           "check_handshakes", "combine_preprocessing", "combine_site_metrics", "survival_grid"]

# The public grid on which sites count uncensored survival times: (up to this many months, cell
# width). Coarse cells keep the DP noise small next to the counts (about 1.4 counts per cell and
# site at epsilon 1); the tail, where glioma deaths are rare, gets wide cells because every cell
# adds its noise to the total that the quantile levels are taken of (with 200 uniform 3-month
# cells the upper edge of a TCGA-sized federation was off by a median 25-40 months, with these
# 46 cells by 12-15). Longer follow-up is counted in the last cell.
SURVIVAL_GRID_CELLS = ((60.0, 3.0), (120.0, 6.0), (240.0, 12.0), (600.0, 60.0))
SURVIVAL_GRID_MAX = SURVIVAL_GRID_CELLS[-1][0]
SURVIVAL_GRID_TEXT = "cells of 3 months to 60, 6 to 120, 12 to 240 and 60 to 600 months"


def survival_grid() -> np.ndarray:
    """Edges of the fixed histogram grid on which sites count uncensored survival times."""
    edges, start = [0.0], 0.0
    for stop, width in SURVIVAL_GRID_CELLS:
        edges += np.arange(start + width, stop + width / 2, width).tolist()
        start = stop
    return np.asarray(edges)


class HandshakeMismatch(FederationError):
    """A site's handshake disagrees with the federation; the message names the site and field."""


def check_handshakes(replies: dict[str, dict], expected_version: str, subtypes: list[str] | None = None) -> dict:
    """Check every site's version and data schema; return the federation's common schema.

    Raises :class:`HandshakeMismatch` listing every mismatch (site, field, its value, expected).
    """
    problems = []
    dims = {s: r["feature_dim"] for s, r in replies.items() if r.get("with_pathology", 0) > 0}
    groups = {s: tuple(r["group_sizes"]) for s, r in replies.items() if r.get("with_genomics", 0) > 0}
    encoders = {s: r.get("encoder") for s, r in replies.items() if r.get("with_pathology", 0) > 0}
    common_dim = _majority(dims)
    common_groups = _majority(groups)
    common_encoder = _majority(encoders)
    for site, reply in sorted(replies.items()):
        if reply["umeml_version"] != expected_version:
            problems.append(f"site {site}: umeml_version {reply['umeml_version']} != coordinator's {expected_version}")
        if site in dims and dims[site] != common_dim:
            problems.append(f"site {site}: feature_dim {dims[site]} != federation's {common_dim}")
        if site in encoders and encoders[site] != common_encoder:
            problems.append(f"site {site}: encoder {encoders[site]!r} != federation's {common_encoder!r}")
        if site in groups and groups[site] != common_groups:
            problems.append(f"site {site}: genomic group sizes {list(groups[site])} != federation's {list(common_groups)}")
        expected_subtypes = list(subtypes) if subtypes is not None else list(next(iter(replies.values()))["subtypes"])
        if list(reply["subtypes"]) != expected_subtypes:
            problems.append(f"site {site}: subtype codes {reply['subtypes']} != coordinator's {expected_subtypes}")
    if problems:
        raise HandshakeMismatch("sites refused:\n  - " + "\n  - ".join(problems))
    any_reply = next(iter(replies.values()))
    return {
        "feature_dim": int(common_dim or 1),
        "encoder": common_encoder,
        "group_sizes": list(common_groups or ()),
        "subtypes": list(any_reply["subtypes"]),
        "grades": list(any_reply["grades"]),
    }


def _majority(values: dict):
    if not values:
        return None
    items = list(values.values())
    return max(set(items), key=items.count)


def combine_preprocessing(replies: dict[str, dict], schema: dict, heads: dict[str, int], n_bins: int,
                          notes: list[str] | None = None) -> Preprocessing:
    """Genomic standardisation, survival bin edges and class weights from the sites' aggregates.

    With a survival head (``heads``), the sites' survival histograms (noisy under
    ``federation.survival_hist_epsilon``) are summed and their quantiles become the bin edges (see
    :func:`edges_from_histogram`); a fallback for a histogram too small for ``n_bins`` bins is
    described in ``notes``. Without one there are no histograms and no edges.
    """
    usable = {s: r for s, r in replies.items() if not r.get("suppressed")}
    if not usable:
        raise ValueError("no training site reported aggregates (all below the k-patient threshold)")
    edges = _survival_edges(usable, n_bins, notes) if "survival" in heads else []
    mean = std = None
    gen = [r for r in usable.values() if r.get("genomic_count")]
    if gen and schema["group_sizes"]:
        # exact moments as before; DP ones (a site's "releases" says so) clamped and shrunk, noted
        scaler = merge_genomic_moments(gen, notes)
        mean, std = scaler.mean.tolist(), scaler.std.tolist()
    weights = {}
    for task in ("grade", "subtype"):
        if task in heads:
            weights[task] = class_weights_from_counts(merge_class_counts(list(usable.values()), task, notes)).tolist()
    return Preprocessing(edges, mean, std, weights, dict(heads), schema["feature_dim"], schema["group_sizes"],
                         schema["subtypes"], schema["grades"])


def _survival_edges(usable: dict[str, dict], n_bins: int, notes: list[str] | None) -> list[float]:
    """Bin edges from the sum of the sites' survival histograms (the task survival only)."""
    n_cells = len(survival_grid()) - 1
    for site, r in sorted(usable.items()):
        if len(r.get("survival_hist") or ()) != n_cells:
            raise ValueError(f"site {site}: survival_hist has {len(r.get('survival_hist') or ())} cells, expected "
                             f"{n_cells} ({SURVIVAL_GRID_TEXT}); is it running another umeml version?")
    hist = np.sum([np.asarray(r["survival_hist"], float) for r in usable.values()], axis=0)
    return edges_from_histogram(survival_grid(), hist, n_bins, notes).tolist()


def combine_site_metrics(site_metrics: dict[str, dict], seed: int = 0, n_boot: int = 1000) -> dict:
    """Combine per-site metrics: mean weighted by n (c-index weighted by comparable pairs).

    The combined CI (``ci_low``/``ci_high``) is a normal approximation from the sites' patient
    bootstrap CIs (each site's standard error taken as its CI width / 3.92), since no per-patient
    value reaches the server; next to it, ``site_ci_low``/``site_ci_high`` resample the sites
    (:func:`umeml.metrics.site_bootstrap_ci`, seeded by ``seed``). A site whose metric is
    undefined (a macro AUC at a site with one class) cannot enter the mean: ``n`` is the patients
    actually used, ``n_reported`` those of every reporting site, and ``dropped`` names each site
    left out with the reason it reported. Each task also lists ``missing_classes``: class indices
    with no patient in the summed confusion matrices of the reporting sites (their AUC is
    undefined; the macro AUC averages the other classes). Sites that reported only a count
    (below k patients) add to ``n_suppressed``.
    """
    combined: dict = {}
    reported = {s: m for s, m in sorted(site_metrics.items()) if not m.get("suppressed")}
    n_suppressed = sum(int(m.get("n", 0)) for m in site_metrics.values() if m.get("suppressed"))
    tasks = sorted({t for m in reported.values() for t in m.get("tasks", {})})
    for task in tasks:
        out = {}
        names = sorted({k for m in reported.values() for k, v in m["tasks"].get(task, {}).items() if _scalar(v)})
        for name in names:
            entry = _combine_metric(task, name, reported, seed, n_boot)
            if entry is not None:
                out[name] = entry
        missing = _missing_classes(task, reported)
        if missing is not None:
            out["missing_classes"] = missing
        combined[task] = out
    combined["n_suppressed"] = n_suppressed
    return combined


def _scalar(v) -> bool:
    return isinstance(v, dict) and "n" in v and not isinstance(v.get("value"), list)


def _combine_metric(task: str, name: str, reported: dict[str, dict], seed: int, n_boot: int) -> dict | None:
    """One metric combined over the sites that have a value (see :func:`combine_site_metrics`)."""
    used, dropped, n_reported = [], {}, 0
    for site, m in reported.items():
        v = m["tasks"].get(task, {}).get(name)
        if not _scalar(v):
            continue
        n_reported += int(v.get("n", 0))
        weight = float((v.get("pairs") if name == "c_index" else v.get("n")) or 0)
        if not has_value(v) or weight <= 0:
            dropped[site] = str(v.get("error") or ("no comparable pair" if has_value(v) else "no value"))
            continue
        used.append((float(v["value"]), weight, v.get("ci_low"), v.get("ci_high"), int(v.get("n", 0))))
    if not used:
        return None
    w = np.array([x[1] for x in used])
    vals = np.array([x[0] for x in used])
    value = float((w * vals).sum() / w.sum())
    entry = {"value": value, "n": int(sum(x[4] for x in used)), "n_reported": n_reported, "sites": len(used),
             "dropped": dropped, "ci_low": None, "ci_high": None}
    if len(used) == 1 and used[0][2] is not None:
        entry["ci_low"], entry["ci_high"] = used[0][2], used[0][3]
    elif all(x[2] is not None and x[3] is not None for x in used):
        se = np.array([(x[3] - x[2]) / 3.92 for x in used])
        se_comb = float(np.sqrt(((w * se) ** 2).sum()) / w.sum())
        entry["ci_low"], entry["ci_high"] = value - 1.96 * se_comb, value + 1.96 * se_comb
    entry.update(site_bootstrap_ci(vals, w, n_boot=n_boot, seed=seed))
    return entry


def _missing_classes(task: str, reported: dict[str, dict]) -> list[int] | None:
    """Class indices no reporting site has a patient of (None without confusion matrices)."""
    mats = [np.asarray(m["tasks"][task]["confusion_matrix"]["value"]) for m in reported.values()
            if isinstance(m["tasks"].get(task, {}).get("confusion_matrix"), dict)]
    if not mats:
        return None
    rows = np.sum(mats, axis=0).sum(axis=1)
    return [int(i) for i in np.flatnonzero(rows == 0)]


"""Patient-level splits: site-disjoint hold-outs, k folds grouped by site, stratified train/val.

Every split is a deterministic function of its seed, and no patient is ever on two sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from umeml.data.cohort import Cohort


@dataclass(frozen=True)
class Split:
    """Indices of a cohort's patients for training, validation and testing."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_sites: tuple[str, ...]

    def check_disjoint(self) -> None:
        """Raise if any patient index sits on two sides (an internal invariant)."""
        parts = [set(self.train.tolist()), set(self.val.tolist()), set(self.test.tolist())]
        if parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]:
            raise RuntimeError("split is not patient-disjoint")


def choose_test_sites(cohort: Cohort, n_test_sites: int, seed: int) -> tuple[str, ...]:
    """Pick ``n_test_sites`` held-out sites at random (seeded) among sites with patients."""
    return choose_held_out(cohort.sites, n_test_sites, seed)


def choose_held_out(sites: list[str] | tuple[str, ...], n_test_sites: int, seed: int) -> tuple[str, ...]:
    """``n_test_sites`` of ``sites`` at random (seeded): the rule of ``split.n_test_sites``, the
    same for a simulation (the cohort's sites) and a deployment (the sites that joined)."""
    sites = sorted(sites)
    if n_test_sites >= len(sites):
        raise ValueError(f"cannot hold out {n_test_sites} of {len(sites)} sites: no site would be left to train on")
    rng = np.random.default_rng(seed)
    return tuple(sorted(rng.choice(sites, size=n_test_sites, replace=False).tolist()))


def site_holdout(cohort: Cohort, test_sites: tuple[str, ...] | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(train-pool, test) indices with every patient of ``test_sites`` in test."""
    unknown = sorted(set(test_sites) - set(cohort.sites))
    if unknown:
        raise ValueError(f"held-out site(s) {unknown} are not in the cohort (sites: {', '.join(cohort.sites)})")
    held = np.array([p.site in set(test_sites) for p in cohort.patients])
    return np.where(~held)[0], np.where(held)[0]


def stratified_train_val(
    cohort: Cohort, indices: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into train/val within each site, stratified by subtype.

    In every (site, subtype) stratum round(val_fraction * n) patients go to validation, so
    small strata may contribute none; a fraction of 0 gives an empty validation set.
    """
    rng = np.random.default_rng(seed)
    indices = np.asarray(indices, dtype=np.int64)
    strata: dict[tuple[str, str], list[int]] = {}
    for i in indices:
        p = cohort.patients[i]
        strata.setdefault((p.site, p.subtype or ""), []).append(int(i))  # "": subtype missing
    val: list[int] = []
    for key in sorted(strata):
        members = np.array(strata[key])
        rng.shuffle(members)
        val.extend(members[: int(round(val_fraction * len(members)))].tolist())
    val_set = set(val)
    train = np.array(sorted(i for i in indices.tolist() if i not in val_set), dtype=np.int64)
    return train, np.array(sorted(val), dtype=np.int64)


def make_split(cohort: Cohort, test_sites: tuple[str, ...], n_test_sites: int, val_fraction: float, seed: int,
               train_sites: tuple[str, ...] = ()) -> Split:
    """The default experiment split: held-out test sites, then a stratified validation split.

    With ``train_sites`` only those sites' patients are trained on (the other sites are unused),
    so a centralized run sees exactly the patients a federation with those sites sees.
    """
    sites = tuple(test_sites) or choose_test_sites(cohort, n_test_sites, seed)
    pool, test = site_holdout(cohort, sites)
    if train_sites:
        unknown = sorted(set(train_sites) - set(cohort.sites))
        if unknown:
            raise ValueError(f"training site(s) {unknown} are not in the cohort")
        if set(train_sites) & set(sites):
            raise ValueError(f"site(s) {sorted(set(train_sites) & set(sites))} are both training and held out")
        pool = np.array([i for i in pool if cohort.patients[i].site in set(train_sites)], dtype=np.int64)
    train, val = stratified_train_val(cohort, pool, val_fraction, seed)
    split = Split(train, val, test, tuple(sorted(sites)))
    split.check_disjoint()
    return split


def site_kfold(cohort: Cohort, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds grouped by site: each site's patients fall in exactly one test fold.

    Sites are shuffled (seeded), then placed largest first into the fold with the fewest
    patients, which balances folds even when site sizes differ by 100x (TCGA).
    """
    sites = cohort.sites
    if n_folds > len(sites):
        raise ValueError(f"{n_folds} folds need at least {n_folds} sites; the cohort has {len(sites)}")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(sites))
    sizes = {s: len(cohort.site_indices(s)) for s in sites}
    order.sort(key=lambda s: -sizes[s])
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    load = [0] * n_folds
    for s in order:
        k = int(np.argmin(load))
        folds[k].append(s)
        load[k] += sizes[s]
    out = []
    for fold_sites in folds:
        train, test = site_holdout(cohort, fold_sites)
        out.append((train, test))
    return out

import numpy as np
import pytest
import torch

from umeml.data.bags import read_features
from umeml.data.cohort import load_data_dir
from umeml.data.dataset import CohortDataset, GenomicScaler, genomic_moments, make_loader
from umeml.data.labels import edges_from_histogram, survival_bin_edges, survival_bins
from umeml.data.sites import normalise_site, tss_code
from umeml.data.splits import make_split, site_kfold, stratified_train_val


@pytest.fixture(scope="module")
def cohort(tiny_cohort_dir):
    return load_data_dir(tiny_cohort_dir)


def test_tss_code_and_normalisation():
    assert tss_code("TCGA-HT-7603") == "HT"
    assert tss_code("PATIENT-1") is None
    assert normalise_site("6") == "06" and normalise_site("HT") == "HT"


def test_site_holdout_split_is_disjoint_and_deterministic(cohort):
    a = make_split(cohort, (), 1, 0.25, seed=3)
    b = make_split(cohort, (), 1, 0.25, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test)))
    assert len(a.test_sites) == 1
    assert {cohort.patients[i].site for i in a.test} == set(a.test_sites)
    assert not ({cohort.patients[i].site for i in a.train} & set(a.test_sites))
    assert len(a.train) + len(a.val) + len(a.test) == len(cohort)
    assert len(set(a.train) | set(a.val) | set(a.test)) == len(cohort)


def test_unknown_or_all_test_sites_rejected(cohort):
    with pytest.raises(ValueError, match="not in the cohort"):
        make_split(cohort, ("NOPE",), 1, 0.2, 0)
    with pytest.raises(ValueError, match="no site would be left"):
        make_split(cohort, (), 3, 0.2, 0)


def test_kfold_grouped_by_site(cohort):
    folds = site_kfold(cohort, 3, seed=0)
    seen = []
    for train, test in folds:
        assert not (set(train) & set(test))
        sites_test = {cohort.patients[i].site for i in test}
        assert not (sites_test & {cohort.patients[i].site for i in train})
        seen.extend(test.tolist())
    assert sorted(seen) == list(range(len(cohort)))
    with pytest.raises(ValueError):
        site_kfold(cohort, 4, 0)


def test_stratified_val_keeps_strata(cohort):
    train, val = stratified_train_val(cohort, np.arange(len(cohort)), 0.5, seed=1)
    assert not (set(train) & set(val))
    for site in cohort.sites:
        in_val = [i for i in val if cohort.patients[i].site == site]
        assert len(in_val) > 0


def test_survival_bins_from_quantiles_and_histogram():
    times = np.array([1, 2, 3, 4, 5, 6, 7, 8.0])
    events = np.array([1, 1, 1, 1, 1, 1, 1, 1])
    edges = survival_bin_edges(times, events, 4)
    assert np.allclose(edges, [2.75, 4.5, 6.25])
    assert survival_bins(np.array([0.5, 3.0, 100.0]), edges).tolist() == [0, 1, 3]
    grid = np.linspace(0, 10, 101)
    hist, _ = np.histogram(times, bins=grid)
    fed = edges_from_histogram(grid, hist, 4)
    assert np.allclose(fed, edges, atol=1.0)


def test_genomic_scaler_from_moments_matches_direct(cohort):
    idx = np.arange(len(cohort))
    scaler = GenomicScaler.fit(cohort, idx)
    rows = cohort.genomics[cohort.has_genomics]
    assert np.allclose(scaler.mean, rows.mean(axis=0), atol=1e-5)
    assert np.allclose(scaler.std, rows.std(axis=0), atol=1e-4)
    # moments of two halves add up to the whole (how a federation combines them)
    a, b = genomic_moments(cohort, idx[:30]), genomic_moments(cohort, idx[30:])
    merged = GenomicScaler.from_moments(*(x + y for x, y in zip(a, b)))
    assert np.allclose(merged.mean, scaler.mean, atol=1e-5)


def test_dataset_items_and_batches(cohort):
    idx = np.arange(len(cohort))
    edges = survival_bin_edges(*cohort.times_events(idx), 4)
    ds = CohortDataset(cohort, idx, edges, GenomicScaler.fit(cohort, idx), max_patches=8, train=True, seed=0)
    no_path = int(np.where(~cohort.has_path)[0][0])
    assert ds[no_path].features is None
    no_gen = int(np.where(~cohort.has_genomics)[0][0])
    assert ds[no_gen].genomics is None
    lens = [ds[i].features.shape[0] for i in range(len(ds)) if cohort.has_path[i]]
    assert max(lens) <= 8
    loader = make_loader(ds, batch_size=7, shuffle=True, seed=0)
    batch = next(iter(loader))
    assert batch.features.shape[0] == 7 and batch.features.shape[2] == 16
    assert batch.patch_mask.dtype == torch.bool
    assert batch.genomics.shape == (7, cohort.gene_groups.dim)
    empty = ds.collate([])
    assert len(empty) == 0 and empty.features.shape[0] == 0


def test_two_slides_pooled_and_eval_uses_full_bag(cohort):
    i = next(k for k, p in enumerate(cohort.patients) if len(p.slide_ids) == 2)
    full = sum(read_features(f).shape[0] for f in cohort.bag_files(i))
    ds = CohortDataset(cohort, np.array([i]), np.array([10.0, 20.0, 30.0]), max_patches=3, train=False)
    assert ds[0].features.shape[0] == full


def test_subsampling_is_seeded(cohort):
    i = int(np.argmax([sum(cohort.bag_patches.get(s, 0) for s in p.slide_ids) for p in cohort.patients]))
    args = (cohort, np.array([i]), np.array([10.0, 20.0, 30.0]))
    a = CohortDataset(*args, max_patches=5, train=True, seed=1)[0].features
    b = CohortDataset(*args, max_patches=5, train=True, seed=1)[0].features
    c = CohortDataset(*args, max_patches=5, train=True, seed=2)[0].features
    assert np.array_equal(a, b) and not np.array_equal(a, c)
